//! The accepted resources as they arrived (protobuf bytes), kept only when someone will read
//! them: the optional admin listener's `/config_dump`. Off by default, because a sidecar's
//! configuration held twice (compiled and raw) costs memory per service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;

/// One accepted resource, as received.
#[derive(Clone, Debug)]
pub struct RetainedResource {
    /// Its xDS version (delta: the resource's; SotW: the hash of its bytes).
    pub version: String,
    /// The resource.
    pub resource: Any,
    /// When it was accepted.
    pub last_updated: SystemTime,
}

/// What the client holds, by type URL and name, and which names are warming.
#[derive(Clone, Debug, Default)]
pub struct RetainedResources {
    /// Accepted resources by type URL, then name.
    pub by_type: BTreeMap<&'static str, BTreeMap<String, RetainedResource>>,
    /// Last accepted version per type URL (`version_info` of the dump sections).
    pub type_versions: BTreeMap<String, String>,
    /// Clusters and listeners accepted but still waiting for their endpoints / routes.
    pub warming: BTreeSet<String>,
    /// The node the client presents.
    pub node: Option<Node>,
}

/// A handle on the resources an [`AdsClient`](super::AdsClient) accepted, shared with whoever
/// renders `/config_dump` (see [`AdsClient::retain_config_dump`](super::AdsClient::retain_config_dump)).
#[derive(Clone, Debug, Default)]
pub struct ConfigDumpSource {
    inner: Arc<Mutex<RetainedResources>>,
}

impl ConfigDumpSource {
    pub(crate) fn lock(&self) -> MutexGuard<'_, RetainedResources> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of what is held now.
    pub fn resources(&self) -> RetainedResources {
        self.lock().clone()
    }

    /// Envoy's admin `/config_dump` JSON (`envoy.admin.v3.*ConfigDump`, full resource bodies
    /// as protobuf-JSON with `@type`) of what is held now; see
    /// [`render_config_dump`](crate::dump::render_config_dump).
    pub fn render(&self) -> serde_json::Value {
        let held = self.lock();
        crate::dump::render_config_dump(&held)
    }

    pub(crate) fn keep(&self, type_url: &'static str, name: &str, version: &str, any: &Any) {
        self.lock().by_type.entry(type_url).or_default().insert(
            name.to_owned(),
            RetainedResource {
                version: version.to_owned(),
                resource: any.clone(),
                last_updated: SystemTime::now(),
            },
        );
    }

    /// Drops every retained resource of `type_url` whose name `held` does not contain.
    pub(crate) fn retain_only(&self, type_url: &'static str, held: impl Fn(&str) -> bool) {
        if let Some(m) = self.lock().by_type.get_mut(type_url) {
            m.retain(|k, _| held(k));
        }
    }
}
