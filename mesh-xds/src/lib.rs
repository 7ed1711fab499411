//! mesh-xds
