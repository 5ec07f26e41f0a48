//! The console's pages, one module each.

pub mod bulk;
pub mod dead_letters;
pub mod flows;
pub mod overview;
pub mod saga;
pub mod sagas;

use axum::body::Bytes;

/// Every (key, value) of an urlencoded form, repeated keys included (a
/// selection of dead letters is several `selected` fields).
pub(crate) fn form_pairs(body: &Bytes) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of `key` in `pairs`.
pub(crate) fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
