//! The catalog: every flow version an orchestrator can run.
//!
//! Several versions of one flow live side by side; a new saga runs the
//! version it asks for (or the latest), and a running saga keeps the version
//! it started with for its whole life.

use std::{collections::BTreeMap, sync::Arc};

use crate::definition::Flow;

/// A lookup failed or a flow was registered twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// No flow of that name.
    #[error("unknown saga type {0:?}")]
    UnknownType(String),
    /// The flow exists but not in that version.
    #[error("saga type {name:?} has no version {version}")]
    UnknownVersion {
        /// The flow.
        name: String,
        /// The version asked for.
        version: u32,
    },
    /// (name, version) must be unique.
    #[error("saga type {name:?} version {version} is registered twice")]
    Duplicate {
        /// The flow.
        name: String,
        /// The repeated version.
        version: u32,
    },
}

/// Every registered flow, by name and version.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Flows keyed by (name, version); versions ordered so the last is the latest.
    flows: BTreeMap<String, BTreeMap<u32, Arc<Flow>>>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flows that ship with saga-orchestrator (see [`crate::flows`]).
    pub fn standard() -> Self {
        let mut catalog = Self::new();
        for flow in crate::flows::all() {
            catalog
                .register(flow)
                .expect("shipped flows have unique (name, version)");
        }
        catalog
    }

    /// Whether no flow is registered.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Adds a flow version.
    pub fn register(&mut self, flow: Flow) -> Result<(), CatalogError> {
        let versions = self.flows.entry(flow.name().to_owned()).or_default();
        if versions.contains_key(&flow.version()) {
            return Err(CatalogError::Duplicate {
                name: flow.name().to_owned(),
                version: flow.version(),
            });
        }
        versions.insert(flow.version(), Arc::new(flow));
        Ok(())
    }

    /// Version `version` of flow `name`; version 0 means the latest.
    pub fn get(&self, name: &str, version: u32) -> Result<Arc<Flow>, CatalogError> {
        let versions = self
            .flows
            .get(name)
            .ok_or_else(|| CatalogError::UnknownType(name.to_owned()))?;
        let found = if version == 0 {
            versions.values().next_back()
        } else {
            versions.get(&version)
        };
        found.cloned().ok_or(CatalogError::UnknownVersion {
            name: name.to_owned(),
            version,
        })
    }

    /// Every flow version, by name then version, with whether it is the latest.
    pub fn list(&self) -> Vec<(Arc<Flow>, bool)> {
        self.flows
            .values()
            .flat_map(|versions| {
                let latest = versions.keys().next_back().copied();
                versions
                    .values()
                    .map(move |flow| (flow.clone(), Some(flow.version()) == latest))
            })
            .collect()
    }

    /// Every participant some step of some flow version calls, once each,
    /// sorted.
    pub fn participants(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<String> = self
            .list()
            .iter()
            .flat_map(|(flow, _)| flow.steps().iter().map(|s| s.participant.to_string()))
            .collect();
        names.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_catalog_resolves_versions() {
        let catalog = Catalog::standard();
        assert_eq!(catalog.get("order_placement", 0).unwrap().version(), 2);
        assert_eq!(catalog.get("order_placement", 1).unwrap().version(), 1);
        assert_eq!(
            catalog.get("order_placement", 9).unwrap_err(),
            CatalogError::UnknownVersion {
                name: "order_placement".into(),
                version: 9
            }
        );
        assert_eq!(
            catalog.get("nope", 0).unwrap_err(),
            CatalogError::UnknownType("nope".into())
        );
        let latest: Vec<_> = catalog
            .list()
            .into_iter()
            .map(|(f, l)| (f.version(), l))
            .collect();
        assert_eq!(latest, vec![(1, false), (2, true)]);
        assert_eq!(catalog.participants(), ["inventory", "orders", "payment"]);
    }

    #[test]
    fn duplicates_are_refused() {
        let mut catalog = Catalog::standard();
        let again = crate::flows::all().remove(0);
        assert!(matches!(
            catalog.register(again),
            Err(CatalogError::Duplicate { .. })
        ));
    }
}
