//! Perch's local HTTP API.
//!
//! Handlers only parse requests into [`Command`]s, hand them to the agent's
//! [`CommandHandler`] and render the [`Reply`] or [`CommandError`] as JSON; they never see the
//! runtime. Requests outside `/v1` and `/metrics` go to the [`HttpGateway`], which serves
//! components' HTTP routes. See `docs/api.md`.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::json;

use perch_core::command::{BoxFuture, DesiredInput};
use perch_core::spec::Limits;
use perch_core::{Command, CommandError, CommandHandler, Digest, ErrorKind, Reply, Trigger};

/// Largest request body accepted (component uploads).
pub const MAX_UPLOAD: usize = perch_core::MAX_COMPONENT_BYTES;
/// Largest system image accepted (`PUT /v1/system/update`): a slot of the firmware image.
pub const MAX_SYSTEM_IMAGE: usize = 512 << 20;
/// Default number of log lines returned.
pub const DEFAULT_LOG_LIMIT: usize = 100;

/// Serves requests that are not for the API: components' HTTP routes.
pub trait HttpGateway: Send + Sync + 'static {
    /// Answers one request.
    fn serve(&self, req: Request) -> BoxFuture<'_, Response>;
}

/// What the router needs.
#[derive(Clone)]
pub struct ApiState {
    handler: Arc<dyn CommandHandler>,
    gateway: Option<Arc<dyn HttpGateway>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("gateway", &self.gateway.is_some())
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// State with a command handler and optionally a gateway for component routes.
    pub fn new(handler: Arc<dyn CommandHandler>, gateway: Option<Arc<dyn HttpGateway>>) -> Self {
        Self { handler, gateway }
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/status", get(status))
        .route(
            "/v1/components",
            get(list_components)
                .post(deploy_unnamed)
                .put(deploy_unnamed),
        )
        .route("/v1/telemetry", get(telemetry))
        .route("/v1/board/gpio/{line}", put(set_gpio).post(set_gpio))
        .route(
            "/v1/components/{name}",
            get(get_component)
                .put(deploy_component)
                .post(deploy_component)
                .delete(remove_component),
        )
        .route("/v1/components/{name}/logs", get(logs))
        .route("/v1/blobs", put(put_blob).post(put_blob))
        .route(
            "/v1/desired",
            get(get_desired).put(apply_desired).post(apply_desired),
        )
        .route("/v1/messages/{*subject}", post(publish))
        .route(
            "/v1/system/update",
            put(install_update)
                .post(install_update)
                .layer(DefaultBodyLimit::max(MAX_SYSTEM_IMAGE)),
        )
        .route("/metrics", get(metrics))
        .route("/v1/metrics", get(metrics))
        .route("/v1", get(not_found_api))
        .route(
            "/v1/{*rest}",
            get(not_found_api)
                .post(not_found_api)
                .put(not_found_api)
                .delete(not_found_api),
        )
        .fallback(gateway)
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(state)
}

/// An error rendered as `{"error": {"kind", "message", "details"}}` with a matching status.
#[derive(Debug)]
pub struct ApiError(pub CommandError);

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        Self(e)
    }
}

/// The HTTP status for an error kind.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            status_for(self.0.kind),
            axum::Json(json!({ "error": self.0 })),
        )
            .into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(CommandError::new(ErrorKind::BadRequest, message))
}

async fn run(state: &ApiState, cmd: Command) -> Result<Reply, ApiError> {
    state.handler.handle(cmd).await.map_err(ApiError)
}

fn json_reply(reply: Reply) -> Response {
    axum::Json(reply).into_response()
}

async fn health(State(s): State<ApiState>) -> Result<Response, ApiError> {
    run(&s, Command::Health).await.map(json_reply)
}

async fn status(State(s): State<ApiState>) -> Result<Response, ApiError> {
    run(&s, Command::Status).await.map(json_reply)
}

async fn list_components(State(s): State<ApiState>) -> Result<Response, ApiError> {
    run(&s, Command::ListComponents).await.map(json_reply)
}

async fn get_component(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, Command::GetComponent { name })
        .await
        .map(json_reply)
}

async fn remove_component(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, Command::RemoveComponent { name })
        .await
        .map(json_reply)
}

fn parse_query(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| bad_request(format!("bad query string: {e}")))
}

fn parse_digest(value: &str) -> Result<Digest, ApiError> {
    value
        .parse()
        .map_err(|e: perch_core::DigestError| bad_request(format!("query `digest`: {e}")))
}

/// Parses `PUT /v1/components/{name}` query parameters into triggers, limits and a digest.
///
/// Every problem is collected so one response lists them all.
pub fn parse_deploy_query(
    pairs: &[(String, String)],
) -> Result<(Vec<Trigger>, Limits, Option<Digest>), CommandError> {
    let mut problems = Vec::new();
    let mut triggers = Vec::new();
    let mut limits = Limits::default();
    let mut digest = None;
    for (k, v) in pairs {
        let short = match k.as_str() {
            "every" => Some(format!("every:{v}")),
            "http" => Some(format!("http:{v}")),
            "message" => Some(format!("message:{v}")),
            "startup" => match v.as_str() {
                "" | "true" | "1" => Some("startup".to_string()),
                _ => {
                    problems.push(format!("query `startup`: expected `true`, got `{v}`"));
                    None
                }
            },
            "trigger" => Some(v.clone()),
            "memory" => {
                match v.parse() {
                    Ok(m) => limits.memory = Some(m),
                    Err(e) => problems.push(format!("query `memory`: {e}")),
                }
                None
            }
            "timeout" => {
                match v.parse() {
                    Ok(t) => limits.timeout = Some(t),
                    Err(e) => problems.push(format!("query `timeout`: {e}")),
                }
                None
            }
            "calls-per-instance" => {
                match v.parse() {
                    Ok(n) => limits.calls_per_instance = Some(n),
                    Err(_) => problems.push(format!(
                        "query `calls-per-instance`: `{v}` is not a whole number"
                    )),
                }
                None
            }
            "instances" => {
                match v.parse() {
                    Ok(n) => limits.instances = Some(n),
                    Err(_) => {
                        problems.push(format!("query `instances`: `{v}` is not a whole number"))
                    }
                }
                None
            }
            "digest" => {
                match v.parse::<Digest>() {
                    Ok(d) => digest = Some(d),
                    Err(e) => problems.push(format!("query `digest`: {e}")),
                }
                None
            }
            other => {
                problems.push(format!(
                    "unknown query parameter `{other}`: expected every, http, message, startup, trigger, memory, timeout, instances, calls-per-instance or digest"
                ));
                None
            }
        };
        if let Some(short) = short {
            match Trigger::parse_short(&short) {
                Ok(t) => triggers.push(t),
                Err(e) => problems.push(format!("query `{k}`: {e}")),
            }
        }
    }
    if problems.is_empty() {
        Ok((triggers, limits, digest))
    } else {
        Err(
            CommandError::new(ErrorKind::BadRequest, "the deploy request has problems")
                .with_details(problems),
        )
    }
}

async fn deploy_unnamed(
    State(s): State<ApiState>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    deploy(s, None, q, body).await
}

async fn deploy_component(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    deploy(s, Some(name), q, body).await
}

async fn set_gpio(
    State(s): State<ApiState>,
    Path(line): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let high = match std::str::from_utf8(&body).map(str::trim) {
        Ok("1" | "high" | "true") => true,
        Ok("0" | "low" | "false") => false,
        _ => {
            return Err(bad_request(
                "the body is the level to set: `1`, `high` or `true`; `0`, `low` or `false`",
            ));
        }
    };
    let reply = run(&s, Command::SetGpioInput { line, high }).await?;
    Ok(axum::Json(reply).into_response())
}

async fn telemetry(State(s): State<ApiState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let mut limit = 100;
    for (k, v) in parse_query(q)? {
        match k.as_str() {
            "limit" => {
                limit = v.parse().map_err(|_| {
                    bad_request(format!("query `limit`: `{v}` is not a whole number"))
                })?;
            }
            other => {
                return Err(bad_request(format!(
                    "unknown query parameter `{other}`: expected `limit`"
                )));
            }
        }
    }
    let reply = run(&s, Command::Telemetry { limit }).await?;
    Ok(axum::Json(reply).into_response())
}

async fn deploy(
    s: ApiState,
    name: Option<String>,
    q: Option<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let pairs = parse_query(q)?;
    let (triggers, limits, expected_digest) = parse_deploy_query(&pairs)?;
    if body.is_empty() {
        return Err(bad_request(
            "the request body is empty: send the component's .wasm bytes",
        ));
    }
    let cmd = Command::DeployComponent {
        name,
        bytes: body.to_vec(),
        expected_digest,
        triggers,
        limits,
    };
    let reply = run(&s, cmd).await?;
    Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
}

async fn put_blob(
    State(s): State<ApiState>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let expected_digest = digest_query(q)?;
    if body.is_empty() {
        return Err(bad_request("the request body is empty"));
    }
    let reply = run(
        &s,
        Command::PutBlob {
            bytes: body.to_vec(),
            expected_digest,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
}

/// The only query parameter of an upload: `digest=sha256:...`.
fn digest_query(q: Option<String>) -> Result<Option<Digest>, ApiError> {
    let mut expected_digest = None;
    for (k, v) in parse_query(q)? {
        match k.as_str() {
            "digest" => expected_digest = Some(parse_digest(&v)?),
            other => {
                return Err(bad_request(format!(
                    "unknown query parameter `{other}`: expected `digest`"
                )));
            }
        }
    }
    Ok(expected_digest)
}

async fn install_update(
    State(s): State<ApiState>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let expected_digest = digest_query(q)?;
    if body.is_empty() {
        return Err(bad_request(
            "the request body is empty: send a slot image (slot.img of `perch image build`)",
        ));
    }
    let reply = run(
        &s,
        Command::InstallUpdate {
            bytes: body.to_vec(),
            expected_digest,
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(reply)).into_response())
}

async fn get_desired(State(s): State<ApiState>) -> Result<Response, ApiError> {
    run(&s, Command::GetDesired).await.map(json_reply)
}

async fn apply_desired(State(s): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let input: DesiredInput = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the desired-state document is not valid: {e}")))?;
    run(&s, Command::ApplyDesired(input)).await.map(json_reply)
}

async fn logs(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let mut limit = DEFAULT_LOG_LIMIT;
    for (k, v) in parse_query(q)? {
        match k.as_str() {
            "limit" => {
                limit = v.parse().map_err(|_| {
                    bad_request(format!("query `limit`: `{v}` is not a whole number"))
                })?
            }
            other => {
                return Err(bad_request(format!(
                    "unknown query parameter `{other}`: expected `limit`"
                )));
            }
        }
    }
    run(&s, Command::Logs { name, limit }).await.map(json_reply)
}

async fn publish(
    State(s): State<ApiState>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    perch_core::spec::check_subject_pattern(&subject).map_err(bad_request)?;
    if subject.contains(['*', '>']) {
        return Err(bad_request(format!(
            "cannot publish to wildcard subject `{subject}`"
        )));
    }
    run(
        &s,
        Command::Publish {
            subject,
            payload: body.to_vec(),
        },
    )
    .await
    .map(json_reply)
}

async fn metrics(State(s): State<ApiState>) -> Result<Response, ApiError> {
    match run(&s, Command::Metrics).await? {
        Reply::Metrics(text) => {
            let mut resp = Response::new(Body::from(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(resp)
        }
        other => Ok(json_reply(other)),
    }
}

async fn not_found_api(req: Request) -> ApiError {
    ApiError(CommandError::new(
        ErrorKind::NotFound,
        format!(
            "no API endpoint `{} {}`; see docs/api.md",
            req.method(),
            req.uri().path()
        ),
    ))
}

async fn gateway(State(s): State<ApiState>, req: Request) -> Response {
    match &s.gateway {
        Some(g) => g.serve(req).await,
        None => ApiError(CommandError::new(
            ErrorKind::NotFound,
            format!("nothing serves `{}`", req.uri().path()),
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use perch_core::command::Health;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// Records commands and answers health; everything else is "not found".
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Command>>);

    impl CommandHandler for Recorder {
        fn handle(&self, command: Command) -> BoxFuture<'_, Result<Reply, CommandError>> {
            self.0.lock().expect("lock").push(command.clone());
            Box::pin(async move {
                match command {
                    Command::Health => Ok(Reply::Health(Health {
                        status: "ok".into(),
                        version: "t".into(),
                    })),
                    Command::Metrics => Ok(Reply::Metrics("perch_up 1\n".into())),
                    _ => {
                        Err(CommandError::new(ErrorKind::NotFound, "nope")
                            .with_details(["a detail"]))
                    }
                }
            })
        }
    }

    async fn call(app: Router, req: axum::http::Request<Body>) -> (StatusCode, String) {
        let resp = app.oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn app() -> (Router, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (router(ApiState::new(rec.clone(), None)), rec)
    }

    fn req(method: &str, uri: &str, body: &'static [u8]) -> axum::http::Request<Body> {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .expect("request")
    }

    #[tokio::test]
    async fn health_is_json() {
        let (app, _) = app();
        let (status, body) = call(app, req("GET", "/v1/health", b"")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, r#"{"status":"ok","version":"t"}"#);
    }

    #[tokio::test]
    async fn deploy_parses_query_into_a_command() {
        let (app, rec) = app();
        let (status, body) = call(
            app,
            req(
                "PUT",
                "/v1/components/timer?every=5s&http=/hi&memory=16MiB&timeout=200ms&instances=2",
                b"\0asm",
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains(r#""details":["a detail"]"#), "{body}");
        let cmds = rec.0.lock().expect("lock");
        let Command::DeployComponent {
            name,
            bytes,
            triggers,
            limits,
            expected_digest,
        } = &cmds[0]
        else {
            panic!("wrong command {:?}", cmds[0]);
        };
        assert_eq!(name.as_deref(), Some("timer"));
        assert_eq!(bytes, b"\0asm");
        assert_eq!(triggers.len(), 2);
        assert_eq!(limits.memory.map(|m| m.bytes()), Some(16 << 20));
        assert_eq!(limits.instances, Some(2));
        assert_eq!(*expected_digest, None);
    }

    #[tokio::test]
    async fn bad_deploy_query_lists_every_problem() {
        let (app, rec) = app();
        let (status, body) = call(
            app,
            req(
                "PUT",
                "/v1/components/x?every=5&memory=16&colour=red&digest=md5:1",
                b"x",
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let details = v["error"]["details"].as_array().expect("details");
        assert_eq!(details.len(), 4, "{body}");
        assert!(body.contains("unknown query parameter `colour`"), "{body}");
        assert!(
            rec.0.lock().expect("lock").is_empty(),
            "nothing reached the core"
        );
    }

    #[tokio::test]
    async fn empty_upload_and_bad_documents_are_refused() {
        let (app, _) = app();
        let (status, body) = call(app.clone(), req("PUT", "/v1/components/x?every=1s", b"")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("body is empty"), "{body}");
        let (status, body) = call(app, req("PUT", "/v1/desired", br#"{"revison": 3}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("unknown field `revison`"), "{body}");
    }

    #[tokio::test]
    async fn unknown_api_paths_are_json_404_and_metrics_are_text() {
        let (app, _) = app();
        let (status, body) = call(app.clone(), req("GET", "/v1/nope", b"")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("no API endpoint `GET /v1/nope`"), "{body}");
        let resp = app
            .oneshot(req("GET", "/metrics", b""))
            .await
            .expect("infallible");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
    }

    #[tokio::test]
    async fn publish_rejects_wildcards() {
        let (app, rec) = app();
        let (status, _) = call(app, req("POST", "/v1/messages/cmd.*", b"x")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(rec.0.lock().expect("lock").is_empty());
    }
}
