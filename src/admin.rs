//! The admin listener (`[server] admin`): `GET /healthz` (200 while serving), `GET /readyz`
//! (200 when the store answers within its timeout, else 503), `GET /metrics` (Prometheus /
//! OpenMetrics text), `GET /` (a self-contained dashboard page, `dashboard.html`), and the
//! operator API ([`crate::counters`]): `GET /v1/status`, `GET` and
//! `DELETE /v1/counters`, behind the bearer token of `[server] admin_token_env` when set (with
//! no token, `DELETE` is refused). Kept apart from the proxy port so it can stay on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::app::App;

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, detail: &str, param: Option<&str>) -> Response<Full<Bytes>> {
    let mut doc = serde_json::json!({
        "type": "urn:tollgate:problem:admin",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(param) = param {
        doc["parameter"] = param.into();
    }
    text(status, "application/problem+json", doc.to_string())
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    text(StatusCode::OK, "application/json", value.to_string())
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time (both
/// sides hashed to 32 bytes first, so not even the length leaks).
fn authorized(request: &Request<Incoming>, token: &crate::policy::Secret) -> bool {
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .unwrap_or("");
    let (a, b) = (
        blake3::hash(presented.as_bytes()),
        blake3::hash(token.0.as_bytes()),
    );
    a.as_bytes()
        .iter()
        .zip(b.as_bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `/v1/…`: the operator API.
async fn v1(app: &App, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let rt = app.runtime();
    let token = rt.policy.server.admin_token.as_ref();
    if let Some(token) = token
        && !authorized(&request, token)
    {
        let mut r = problem(
            StatusCode::UNAUTHORIZED,
            "The admin API needs Authorization: Bearer <token>.",
            None,
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let method = request.method().clone();
    match (request.uri().path(), &method) {
        ("/v1/status", &Method::GET) => json(&crate::counters::status(&rt, &app.metrics)),
        ("/v1/counters", &Method::GET | &Method::DELETE) => {
            if method == Method::DELETE && token.is_none() {
                return problem(
                    StatusCode::FORBIDDEN,
                    "Resetting counters needs [server] admin_token_env.",
                    None,
                );
            }
            let query = request.uri().query().unwrap_or("");
            let (name, identity) = match crate::counters::parse_query(query) {
                Ok(q) => q,
                Err(e) => {
                    return problem(StatusCode::BAD_REQUEST, &e.to_string(), Some(e.param));
                }
            };
            let Some(route) = rt.policy.routes.iter().find(|r| *r.name == *name) else {
                return problem(
                    StatusCode::NOT_FOUND,
                    "No route has this name.",
                    Some("route"),
                );
            };
            let answer = if method == Method::DELETE {
                crate::counters::reset(&rt, route, &identity).await
            } else {
                crate::counters::read(&rt, route, &identity).await
            };
            match answer {
                Ok(value) => json(&value),
                Err(e) => {
                    tracing::warn!(error = %e, "counters API: the store failed");
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "The rate-limit store did not answer.",
                        None,
                    )
                }
            }
        }
        ("/v1/status" | "/v1/counters", _) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => problem(StatusCode::NOT_FOUND, "No such admin endpoint.", None),
    }
}

async fn handle(app: &App, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path().starts_with("/v1/") {
        return v1(app, request).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match request.uri().path() {
        // The dashboard: one page, inline CSS and script, drawn from /v1/status.
        "/" => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            include_str!("dashboard.html"),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match app.runtime().limiter.ping().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("store unavailable: {e}\n"),
            ),
        },
        // Prometheus text by default; OpenMetrics for a scraper that asks for it.
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if openmetrics {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    app.metrics.render(),
                )
            } else {
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    crate::metrics::to_prometheus_text(&app.metrics.render()),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Transient (EMFILE, ECONNABORTED): back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(crate::server::ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(handle(&app, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}
