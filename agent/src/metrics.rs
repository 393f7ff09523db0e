//! The agent's metrics registry. Each subsystem registers its own families
//! (a `…Metrics::new(&mut Registry)` of its own, as in ztunnel); this module
//! only holds the registry, the label helper they share, and encodes.
//! Families are prefixed `istio_` (Istio's standard metrics, the names and
//! labels ztunnel emits) or `nodemesh_` (the agent's own, bounded labels).
use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

/// A label value that encodes as `unknown` when missing, as Istio documents
/// ("or 'unknown' if … missing").
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct OrUnknown(Option<String>);

impl OrUnknown {
    pub fn unknown() -> Self {
        Self(None)
    }
}

impl<S: Into<String>> From<S> for OrUnknown {
    fn from(s: S) -> Self {
        let s = s.into();
        Self((!s.is_empty()).then_some(s))
    }
}

impl EncodeLabelValue for OrUnknown {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Registered families, encoded on each scrape. Registration happens while
/// the agent starts (the admin server already answers then).
pub struct MetricsRegistry {
    registry: Mutex<Registry>,
}

impl MetricsRegistry {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        // A gauge of 1, not an OpenMetrics info: the classic text format
        // (and promtool) has no info type.
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.sub_registry_with_prefix("nodemesh").register(
            "build_info",
            "The agent's version",
            build_info,
        );
        Arc::new(Self {
            registry: Mutex::new(registry),
        })
    }

    /// Registers a subsystem's `nodemesh_` families.
    pub fn own<T>(&self, register: impl FnOnce(&mut Registry) -> T) -> T {
        let mut r = self.lock();
        register(r.sub_registry_with_prefix("nodemesh"))
    }

    /// Registers Istio's standard families (`istio_`).
    pub fn istio<T>(&self, register: impl FnOnce(&mut Registry) -> T) -> T {
        let mut r = self.lock();
        register(r.sub_registry_with_prefix("istio"))
    }

    /// The OpenMetrics text of every metric (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock())?;
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn subsystems_register_under_their_prefix() {
        let m = MetricsRegistry::new();
        let c: Counter = m.own(|r| {
            let c = Counter::default();
            r.register("things", "Things", c.clone());
            c
        });
        c.inc();
        let text = m.encode().unwrap();
        assert!(text.contains("nodemesh_things_total 1"), "{text}");
        assert!(
            text.contains("nodemesh_build_info{version=\"0.1.0\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
