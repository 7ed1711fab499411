//! mesh-dns
