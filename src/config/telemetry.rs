//! `[telemetry]`: the OTLP/HTTP collector traces go to, the service name they carry, and the
//! share of new traces sampled.

use std::str::FromStr;

use http::uri::{PathAndQuery, Scheme};

use super::raw::{RawTelemetry, S};
use super::validate::{Validator, parse_target};
use crate::telemetry::Settings;

/// The path OTLP/HTTP collectors take traces on, used when the endpoint names no path.
const TRACES_PATH: &str = "/v1/traces";

pub(super) fn telemetry(v: &mut Validator, raw: &S<RawTelemetry>) -> Option<Settings> {
    let t = raw.get_ref();
    let text = t.otlp_endpoint.get_ref().trim();
    let bad = |why: &str| {
        format!(
            "invalid otlp_endpoint \"{text}\": {why}; expected an http:// or https:// URL, e.g. \"http://127.0.0.1:4318\""
        )
    };
    let uri = match http::Uri::from_str(text) {
        Ok(uri) if uri.scheme().is_some() && uri.authority().is_some() => uri,
        _ => {
            v.error(t.otlp_endpoint.span(), bad("not a URL"));
            return None;
        }
    };
    if uri.query().is_some() {
        v.error(t.otlp_endpoint.span(), bad("a query string is not allowed"));
        return None;
    }
    // The endpoint's scheme and authority are checked as an upstream target's are.
    let base = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or_default(),
        uri.authority().map_or("", |a| a.as_str())
    );
    let endpoint = match parse_target(&base) {
        Ok(target) => target,
        Err(message) => {
            v.error(
                t.otlp_endpoint.span(),
                message.replace("target", "otlp_endpoint"),
            );
            return None;
        }
    };
    let path = match uri.path() {
        "" | "/" => PathAndQuery::from_static(TRACES_PATH),
        p => PathAndQuery::from_str(p).expect("a path of a valid URI"),
    };
    let service_name = match &t.service_name {
        None => "tollgate".to_string(),
        Some(name) if !name.get_ref().trim().is_empty() => name.get_ref().trim().to_string(),
        Some(name) => {
            v.error(name.span(), "service_name must not be empty");
            return None;
        }
    };
    let sample_ratio = match &t.sample_ratio {
        None => 1.0,
        Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
        Some(r) => {
            v.error(
                r.span(),
                format!(
                    "sample_ratio {} is out of range; expected a number from 0 (no new traces) to 1 (every request)",
                    r.get_ref()
                ),
            );
            return None;
        }
    };
    let ca = match &t.tls_ca {
        None => None,
        Some(ca) if endpoint.scheme == Scheme::HTTPS => Some(v.base_dir.join(ca.get_ref())),
        Some(ca) => {
            v.error(ca.span(), "tls_ca needs an https:// otlp_endpoint");
            return None;
        }
    };
    Some(Settings {
        endpoint,
        path,
        ca,
        service_name,
        sample_ratio,
    })
}
