//! What the public errors of every boundary share: the cause they keep.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The failure underneath an error (an I/O error, a Redis error, or a sentence where there
/// is nothing more), kept as that error's [`source`](Error::source) so a caller can walk the
/// chain or [`downcast_ref`](Cause::downcast_ref) it. Cheap to clone: an error handed to
/// several waiters shares one.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    /// Wraps an error, or a sentence (`&str`, `String`) where there is no error to keep.
    pub fn new(cause: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(Arc::from(cause.into()))
    }

    /// The cause as `E`, if it is one.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

impl From<&str> for Cause {
    fn from(sentence: &str) -> Self {
        Self::new(sentence)
    }
}

impl From<String> for Cause {
    fn from(sentence: String) -> Self {
        Self::new(sentence)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

/// `error` and its sources, outermost first, joined with ": " (one line for a log or a
/// person). A source whose text the line already ends with is left out: some errors (Redis
/// errors, for one) print their source themselves and return it too.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let said = source.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = source.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Cause);

    #[test]
    fn a_cause_keeps_the_error_it_wraps_and_its_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = Outer(Cause::new(io));
        assert_eq!(chain(&outer), "outer: refused");
        let kept = outer.0.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(kept.kind(), std::io::ErrorKind::ConnectionRefused);
        let sentence = Outer(Cause::new("the server closed the connection"));
        assert_eq!(chain(&sentence), "outer: the server closed the connection");
        assert!(sentence.0.downcast_ref::<std::io::Error>().is_none());
    }

    /// Prints its source and returns it, as Redis errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("connection failed: {0}")]
    struct SaysItsSource(#[source] std::io::Error);

    #[test]
    fn a_source_an_error_already_printed_is_not_repeated() {
        let io = std::io::Error::other("refused");
        let outer = Outer(Cause::new(SaysItsSource(io)));
        assert_eq!(chain(&outer), "outer: connection failed: refused");
    }
}
