//! Printing an error with its causes, each once.
//!
//! Error types here print only themselves (`#[error("database error")]`
//! over a `#[source]`), so that a log line or a reply reason shows each
//! cause once: [`Chain`] walks the sources. Some foreign errors already
//! repeat their source in their own text; a cause whose text is already
//! shown is not written again.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `": "`-separated.
///
/// ```
/// use sagas::errors::Chain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot start")]
/// struct Outer(#[source] std::io::Error);
///
/// let error = Outer(std::io::Error::other("disk full"));
/// assert_eq!(Chain(&error).to_string(), "cannot start: disk full");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle says: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let error = Outer(Middle(std::io::Error::other("root")));
        // The middle error repeats its source in its own text: not again.
        assert_eq!(Chain(&error).to_string(), "outer: middle says: root");
    }
}
