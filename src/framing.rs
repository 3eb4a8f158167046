//! Request framing and head checks beyond what hyper enforces, applied before anything else:
//! exactly one Host on HTTP/1.1, and a `Transfer-Encoding` that is exactly `chunked` (never
//! together with `Content-Length`, never on HTTP/1.0). Anything a front end and a back end could
//! read differently is refused, so no second request can be smuggled past tollgate.

use http::{HeaderMap, StatusCode, Version, header};

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("more than one Host header")]
    SeveralHosts,
    #[error("HTTP/1.1 request without Host")]
    NoHost,
    #[error("Transfer-Encoding must be exactly \"chunked\"")]
    BadTransferEncoding,
    #[error("transfer coding other than chunked is not supported")]
    UnsupportedCoding,
    #[error("both Transfer-Encoding and Content-Length: ambiguous framing")]
    Ambiguous,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingOnHttp10,
}

impl FramingError {
    pub fn status(self) -> StatusCode {
        match self {
            FramingError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            FramingError::SeveralHosts
            | FramingError::NoHost
            | FramingError::BadTransferEncoding
            | FramingError::Ambiguous
            | FramingError::TransferEncodingOnHttp10 => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a request head.
pub fn check(version: Version, headers: &HeaderMap) -> Result<(), FramingError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(FramingError::SeveralHosts),
        (None, None) if version == Version::HTTP_11 => return Err(FramingError::NoHost),
        _ => {}
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    if version == Version::HTTP_10 {
        return Err(FramingError::TransferEncodingOnHttp10);
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(FramingError::Ambiguous);
    }
    let mut chunked = 0;
    let mut other = false;
    for value in codings {
        let Ok(value) = value.to_str() else {
            return Err(FramingError::BadTransferEncoding);
        };
        for token in value.split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else if token.is_empty() {
                return Err(FramingError::BadTransferEncoding);
            } else {
                other = true;
            }
        }
    }
    match (chunked, other) {
        (1, false) => Ok(()),
        (1, true) => Err(FramingError::UnsupportedCoding),
        _ => Err(FramingError::BadTransferEncoding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hosts() {
        let v11 = Version::HTTP_11;
        assert_eq!(check(v11, &head(&[])), Err(FramingError::NoHost));
        assert_eq!(check(Version::HTTP_10, &head(&[])), Ok(()));
        assert_eq!(check(Version::HTTP_2, &head(&[])), Ok(()));
        assert_eq!(
            check(v11, &head(&[("host", "a"), ("host", "b")])),
            Err(FramingError::SeveralHosts)
        );
        assert_eq!(check(v11, &head(&[("host", "a")])), Ok(()));
    }

    #[test]
    fn transfer_encoding_must_be_exactly_chunked() {
        let h = |te: &[&str]| {
            let mut pairs = vec![("host", "a")];
            pairs.extend(te.iter().map(|t| ("transfer-encoding", *t)));
            check(Version::HTTP_11, &head(&pairs))
        };
        assert_eq!(h(&["chunked"]), Ok(()));
        assert_eq!(h(&["Chunked"]), Ok(()));
        assert_eq!(
            h(&["chunked, chunked"]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            h(&["chunked", "chunked"]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(h(&[",chunked"]), Err(FramingError::BadTransferEncoding));
        assert_eq!(h(&["gzip"]), Err(FramingError::BadTransferEncoding));
        assert_eq!(h(&["gzip, chunked"]), Err(FramingError::UnsupportedCoding));
        assert_eq!(
            FramingError::UnsupportedCoding.status(),
            StatusCode::NOT_IMPLEMENTED
        );
        let both = head(&[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
        ]);
        assert_eq!(check(Version::HTTP_11, &both), Err(FramingError::Ambiguous));
        let old = head(&[("transfer-encoding", "chunked")]);
        assert_eq!(
            check(Version::HTTP_10, &old),
            Err(FramingError::TransferEncodingOnHttp10)
        );
    }
}
