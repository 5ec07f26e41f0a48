//! The saga filter shared by `ListSagas` and `RetryFailedSagas`, checked
//! once here: valid names, a known flow and version, a real time range,
//! declared search attributes. What a principal may not read is filtered
//! out here too, so no caller can forget it.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sagas::{
    Catalog,
    definition::MAX_ATTRIBUTE_VALUE_BYTES,
    names::{AttributeName, SagaType},
};
use tonic::Status;

use super::{check_idempotency_key, denied, invalid};
use crate::{
    security::{Permission, Principal, Visible},
    store::sagas::SagaFilter,
};

/// The filter as it arrives, from either request.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// Empty = every type.
    pub saga_type: &'a str,
    /// 0 = every version.
    pub definition_version: u32,
    /// Empty = any key.
    pub idempotency_key: &'a str,
    /// Inclusive lower bound.
    pub created_after: Option<&'a prost_types::Timestamp>,
    /// Exclusive upper bound.
    pub created_before: Option<&'a prost_types::Timestamp>,
    /// Exact matches on search attributes.
    pub attributes: &'a HashMap<String, String>,
}

fn time(field: &str, at: Option<&prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Status> {
    let Some(at) = at else { return Ok(None) };
    let nanos = u32::try_from(at.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| invalid(field, format!("nanos {} is not in 0..1e9", at.nanos)))?;
    DateTime::from_timestamp(at.seconds, nanos)
        .map(Some)
        .ok_or_else(|| invalid(field, format!("{} seconds is out of range", at.seconds)))
}

/// Checks `fields` and returns the filter, limited to the saga types
/// `principal` holds `permission` for.
pub fn parse(
    fields: Fields<'_>,
    catalog: &Catalog,
    principal: &Principal,
    permission: Permission,
) -> Result<SagaFilter, Status> {
    let saga_type = (!fields.saga_type.is_empty()).then_some(fields.saga_type);
    if let Some(name) = saga_type {
        SagaType::new(name).map_err(|e| invalid("saga_type", e))?;
        if catalog.get(name, 0).is_err() {
            return Err(Status::not_found(format!(
                "saga_type: unknown saga type {name:?}"
            )));
        }
    }
    let version = match (fields.definition_version, saga_type) {
        (0, _) => None,
        (version, Some(name)) => {
            catalog
                .get(name, version)
                .map_err(|e| Status::not_found(format!("definition_version: {e}")))?;
            Some(version)
        }
        (_, None) => {
            return Err(invalid(
                "definition_version",
                "needs saga_type: versions are per flow",
            ));
        }
    };
    check_idempotency_key(fields.idempotency_key)?;
    let created_from = time("created_after", fields.created_after)?;
    let created_to = time("created_before", fields.created_before)?;
    if let (Some(from), Some(to)) = (created_from, created_to)
        && from >= to
    {
        return Err(invalid(
            "created_before",
            format!("{to} is not later than created_after {from}: the range is empty"),
        ));
    }
    // An attribute no candidate flow declares can never match: say so
    // rather than answer an empty page.
    let declared: BTreeSet<String> = catalog
        .list()
        .iter()
        .filter(|(flow, _)| saga_type.is_none_or(|name| flow.name() == name))
        .flat_map(|(flow, _)| flow.search_attributes().iter().map(ToString::to_string))
        .collect();
    let mut attributes: Vec<(String, String)> = Vec::new();
    for (name, value) in fields.attributes {
        AttributeName::new(name.as_str()).map_err(|e| invalid("attributes", e))?;
        let field = format!("attributes.{name}");
        if !declared.contains(name) {
            let known = if declared.is_empty() {
                "none".to_owned()
            } else {
                declared.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            return Err(invalid(
                &field,
                format!(
                    "is not a search attribute of {}; searchable: {known}",
                    saga_type.unwrap_or("any flow")
                ),
            ));
        }
        if value.is_empty() {
            return Err(invalid(&field, "must not be empty"));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            return Err(invalid(
                &field,
                format!("must be at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes"),
            ));
        }
        attributes.push((name.clone(), value.clone()));
    }
    // One order, so one filter is one statement text (and one plan).
    attributes.sort();
    // A principal limited to some flows sees only their sagas.
    let saga_types = match (saga_type, principal.visible(permission)) {
        (Some(name), _) => {
            principal.check(permission, name).map_err(denied)?;
            Some(vec![name.to_owned()])
        }
        (None, Visible::All) => None,
        (None, Visible::Only(types)) => Some(types.into_iter().collect()),
    };
    Ok(SagaFilter {
        saga_types,
        version,
        status: None,
        idempotency_key: (!fields.idempotency_key.is_empty())
            .then(|| fields.idempotency_key.to_owned()),
        created_from,
        created_to,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::standard()
    }

    fn anyone() -> Principal {
        Principal::open()
    }

    fn fields(attributes: &HashMap<String, String>) -> Fields<'_> {
        Fields {
            saga_type: "",
            definition_version: 0,
            idempotency_key: "",
            created_after: None,
            created_before: None,
            attributes,
        }
    }

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn declared_attributes_are_accepted_and_others_named() {
        let wanted = HashMap::from([("order_id".to_owned(), "o-123".to_owned())]);
        let filter = parse(fields(&wanted), &catalog(), &anyone(), Permission::Read).unwrap();
        assert_eq!(
            filter.attributes,
            [("order_id".to_owned(), "o-123".to_owned())]
        );

        let unknown = HashMap::from([("colour".to_owned(), "red".to_owned())]);
        let error = parse(fields(&unknown), &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error.message().starts_with("attributes.colour:"),
            "{}",
            error.message()
        );
        assert!(error.message().contains("order_id"), "{}", error.message());

        let badly_named = HashMap::from([("Order Id".to_owned(), "x".to_owned())]);
        let error = parse(
            fields(&badly_named),
            &catalog(),
            &anyone(),
            Permission::Read,
        )
        .unwrap_err();
        assert!(
            error.message().starts_with("attributes:"),
            "{}",
            error.message()
        );

        let empty = HashMap::from([("order_id".to_owned(), String::new())]);
        let error = parse(fields(&empty), &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert!(
            error.message().starts_with("attributes.order_id:"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn ranges_must_be_real_and_versions_need_a_type() {
        let none = HashMap::new();
        let mut backwards = fields(&none);
        let (later, earlier) = (at(2_000_000_000), at(1_000_000_000));
        backwards.created_after = Some(&later);
        backwards.created_before = Some(&earlier);
        let error = parse(backwards, &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error.message().starts_with("created_before:"),
            "{}",
            error.message()
        );

        let bad_nanos = prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        };
        let mut malformed = fields(&none);
        malformed.created_after = Some(&bad_nanos);
        let error = parse(malformed, &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert!(
            error.message().starts_with("created_after:"),
            "{}",
            error.message()
        );

        let mut versioned = fields(&none);
        versioned.definition_version = 2;
        let error = parse(versioned, &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert!(
            error.message().starts_with("definition_version:"),
            "{}",
            error.message()
        );
        versioned.saga_type = "order_placement";
        let filter = parse(versioned, &catalog(), &anyone(), Permission::Read).unwrap();
        assert_eq!(filter.version, Some(2));
        versioned.definition_version = 99;
        let error = parse(versioned, &catalog(), &anyone(), Permission::Read).unwrap_err();
        assert_eq!(error.code(), tonic::Code::NotFound);
    }
}
