//! NDS `NameTable` → [`mesh_core::name_table::NameTable`].

use mesh_core::name_table::{NameInfo, NameTable};

use super::TranslateError;
use crate::istio_proto;

impl prost::Name for istio_proto::NameTable {
    const NAME: &'static str = "NameTable";
    const PACKAGE: &'static str = "istio.networking.nds.v1";
    fn full_name() -> String {
        "istio.networking.nds.v1.NameTable".into()
    }
    fn type_url() -> String {
        istio_proto::NAME_TABLE_TYPE_URL.into()
    }
}

/// Translates istiod's name table; every address must be an IP literal.
pub fn translate_name_table(table: &istio_proto::NameTable) -> Result<NameTable, TranslateError> {
    let mut out = NameTable::default();
    for (host, info) in &table.table {
        let mut ips = Vec::with_capacity(info.ips.len());
        for ip in &info.ips {
            let parsed = ip.parse().map_err(|_| {
                TranslateError::new(
                    "NameTable",
                    "",
                    format!("table[{host:?}].ips: {ip:?} is not an IP address"),
                )
            })?;
            ips.push(parsed);
        }
        out.table.insert(
            host.clone(),
            NameInfo {
                ips,
                registry: info.registry.clone(),
                shortname: info.shortname.clone(),
                namespace: info.namespace.clone(),
                alt_hosts: info.alt_hosts.clone(),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_entries_and_rejects_non_ips() {
        let mut t = istio_proto::NameTable::default();
        t.table.insert(
            "reviews.default.svc.cluster.local".into(),
            istio_proto::NameInfo {
                ips: vec!["10.0.0.9".into(), "fd00::9".into()],
                registry: "Kubernetes".into(),
                shortname: "reviews".into(),
                namespace: "default".into(),
                alt_hosts: vec![],
            },
        );
        let nt = translate_name_table(&t).unwrap();
        let e = &nt.table["reviews.default.svc.cluster.local"];
        assert_eq!(e.ips.len(), 2);
        assert_eq!(e.shortname, "reviews");
        t.table
            .get_mut("reviews.default.svc.cluster.local")
            .unwrap()
            .ips
            .push("10.0.0.0/8".into());
        let err = translate_name_table(&t).unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
    }
}
