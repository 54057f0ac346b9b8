//! Routing and handlers. A path resolves to a [`Route`] first, then the method picks the
//! handler, so a known path with the wrong method gets 405 rather than 404.
//!
//! Handlers reach the store through `StoreCalls`: reads run on the async worker where the
//! store's reads are local (SQLite, memory), and anything that may write goes to the
//! blocking pool. A route with a body reads its token's owner first and only then the
//! body. The two most frequent calls, a poll and a heartbeat, are usually one read, and go
//! to the blocking pool only when they turn out to write (an overdue request, a claim, a
//! stale `last_seen_at`). Waiting calls (`wait_ms`) register with the instance's waiters
//! and park until woken, until their wait ends, or until shutdown begins.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};

use super::connection::{Answer, Connection, Full};
use super::error::ApiError;
use super::json;
use super::kinds;
use super::wire::{self, HeartbeatAck, RequestRecord, RuntimeList, RuntimeRecord};
use super::{App, StoreCalls};
use crate::clock::millis;
use crate::ids::{RequestId, RuntimeId, Token, TokenHash, WorkspaceId};
use crate::instance::Source;
use crate::kind::{Coalesce, Kind};
use crate::metrics;
use crate::model::{Report, ReportOutcome, StoredRequest};
use crate::store::{
    Added, ApiTokenUse, Ask, Asked, Daemon, Handed, Heartbeat, NewRequest, NewRuntime,
    RuntimeCursor, Scoped,
};

/// Every path the service answers. Ids are still text: handlers parse them, so that an
/// id that cannot exist gets the same 404 as one that does not.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route<'a> {
    /// The web page, and its script and stylesheet.
    Page,
    Asset(&'a str),
    /// This API's OpenAPI document.
    OpenApi,
    Healthz,
    Readyz,
    Metrics,
    Runtimes,
    Runtime(&'a str),
    /// The UI's create of a request of this kind for a runtime.
    Create(&'a str, Kind),
    /// The UI's read of one request of this kind.
    Read(&'a str, Kind, &'a str),
    /// Rotation of a runtime's daemon token.
    DaemonToken(&'a str),
    Heartbeat,
    /// The daemon's report on one request of this kind.
    Result(&'a str, Kind, &'a str),
}

/// Each kind's route templates, made once from the kinds table: `[create, read, result]`.
static TEMPLATES: LazyLock<Vec<[String; 3]>> = LazyLock::new(|| {
    Kind::ALL
        .iter()
        .map(|kind| {
            let path = kind.spec().path;
            [
                format!("/api/runtimes/{{runtimeId}}/{path}"),
                format!("/api/runtimes/{{runtimeId}}/{path}/{{requestId}}"),
                format!("/api/daemon/runtimes/{{runtimeId}}/{path}/{{requestId}}/result"),
            ]
        })
        .collect()
});

/// The kind whose path is `segments`, then what follows it: a create's path exactly
/// (tried first, so that `local-skills/import` is never read as a skill list's id), else
/// a path and one more segment.
fn kind_path<'a>(segments: &[&'a str]) -> Option<(Kind, Option<&'a str>)> {
    let path = |kind: Kind| kind.spec().path.split('/');
    let exact = |kind: &Kind| path(*kind).eq(segments.iter().copied());
    if let Some(kind) = Kind::ALL.into_iter().find(exact) {
        return Some((kind, None));
    }
    let (id, before) = segments.split_last()?;
    let kind = Kind::ALL
        .into_iter()
        .find(|kind| path(*kind).eq(before.iter().copied()))?;
    Some((kind, Some(*id)))
}

impl<'a> Route<'a> {
    pub fn resolve(path: &'a str) -> Option<Self> {
        if path == "/" {
            return Some(Route::Page);
        }
        let rest = path.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        Some(match segments.as_slice() {
            ["assets", name] => Route::Asset(name),
            ["openapi.yaml"] => Route::OpenApi,
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["api", "runtimes"] => Route::Runtimes,
            ["api", "runtimes", rt] => Route::Runtime(rt),
            ["api", "runtimes", rt, "daemon-token"] => Route::DaemonToken(rt),
            ["api", "runtimes", rt, rest @ ..] => match kind_path(rest)? {
                (kind, None) => Route::Create(rt, kind),
                (kind, Some(id)) => Route::Read(rt, kind, id),
            },
            ["api", "daemon", "heartbeat"] => Route::Heartbeat,
            ["api", "daemon", "runtimes", rt, rest @ .., "result"] => match kind_path(rest)? {
                (kind, Some(id)) => Route::Result(rt, kind, id),
                (_, None) => return None,
            },
            _ => return None,
        })
    }

    /// The methods this path answers, for the `Allow` header of a 405. `HEAD` wherever
    /// `GET`.
    pub fn allowed(self) -> &'static str {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics | Route::Read(..) => "GET, HEAD",
            Route::Page | Route::Asset(_) | Route::OpenApi => "GET, HEAD",
            Route::Runtimes => "GET, HEAD, POST",
            Route::Runtime(_) => "DELETE",
            Route::Create(..) | Route::Heartbeat | Route::Result(..) => "POST",
            Route::DaemonToken(_) => "POST",
        }
    }

    /// The routes a browser page calls with an API token: the only ones that answer CORS.
    /// The daemon's routes never do.
    pub fn is_ui(self) -> bool {
        matches!(
            self,
            Route::Runtimes
                | Route::Runtime(_)
                | Route::Create(..)
                | Route::Read(..)
                | Route::DaemonToken(_)
        )
    }

    /// The path as a template, for metric labels and logs: never the ids themselves, so
    /// the number of label values stays fixed.
    pub fn template(self) -> &'static str {
        match self {
            Route::Page => "/",
            Route::Asset(_) => "/assets/{name}",
            Route::OpenApi => "/openapi.yaml",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Runtimes => "/api/runtimes",
            Route::Runtime(_) => "/api/runtimes/{runtimeId}",
            Route::Create(_, kind) => &TEMPLATES[kind.index()][0],
            Route::Read(_, kind, _) => &TEMPLATES[kind.index()][1],
            Route::DaemonToken(_) => "/api/runtimes/{runtimeId}/daemon-token",
            Route::Heartbeat => "/api/daemon/heartbeat",
            Route::Result(_, kind, _) => &TEMPLATES[kind.index()][2],
        }
    }
}

/// The route label of a path that matches no route.
const UNMATCHED: &str = "unmatched";

/// The method as a label: anything but the common ones is `other`, so that made-up methods
/// cannot add label values without end.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// What a handler needs of a request's head, copied out of it.
struct Head {
    method: Method,
    path: String,
    query: Option<String>,
    token: Option<Token>,
    /// The `Origin` of a browser's cross-origin call, when it is one of `--cors-origin`.
    allowed_origin: Option<header::HeaderValue>,
    /// Whether it is a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
    preflight: bool,
}

pub async fn handle(
    app: Arc<App>,
    connection: &Arc<Connection>,
    request: Request<Incoming>,
) -> Response<Answer> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // The head's URI and header values are slices of the connection's read buffer: kept
    // for the length of a held call, they would make hyper take a new buffer for the
    // connection (8 KiB per held call, measured). Copy out what is used, and let them go.
    let head = Head {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        token: wire::bearer(parts.headers.get(header::AUTHORIZATION)),
        allowed_origin: parts
            .headers
            .get(header::ORIGIN)
            .filter(|origin| {
                app.cors_origins
                    .iter()
                    .any(|allowed| origin.as_bytes() == allowed.as_bytes())
            })
            // A copy: the original is a slice of the connection's read buffer.
            .and_then(|origin| header::HeaderValue::from_bytes(origin.as_bytes()).ok()),
        preflight: parts.method == Method::OPTIONS
            && parts
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD),
    };
    drop(parts);
    let resolved = Route::resolve(&head.path);
    let ui = resolved.is_some_and(Route::is_ui);
    let route = resolved.map_or(UNMATCHED, Route::template);
    let cors = head.allowed_origin.clone().filter(|_| ui);
    let method = method_label(&head.method);
    let api = head.path.starts_with("/api/");
    let response = match dispatch(&app, connection, head, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    // Counted against the connection's and the server's budgets of answer bytes not yet
    // sent; past either, a large answer is not kept but refused.
    let (parts, bytes) = response.into_parts();
    let (mut response, refused) = match connection.answer(bytes) {
        Ok(answer) => (Response::from_parts(parts, answer), None),
        Err(full) => {
            let refused = ApiError::AnswersQueued(full == Full::Connection).into_response();
            let (parts, bytes) = refused.into_parts();
            (
                Response::from_parts(parts, connection.uncounted(bytes)),
                Some(full),
            )
        }
    };
    if let Some(full) = refused {
        tracing::warn!(
            ?full,
            route,
            "answer refused: too many answer bytes not yet sent"
        );
    }
    // API answers are about one caller's data, and the creation of a runtime carries its
    // daemon token: no cache, shared or private, may keep one.
    if api {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
    }
    if let Some(origin) = cors {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    if ui {
        // The answer depends on the Origin sent: no cache may give one origin's to another.
        response
            .headers_mut()
            .insert(header::VARY, header::HeaderValue::from_static("Origin"));
    }
    let took = started.elapsed();
    let status = response.status().as_u16();
    app.metrics.observe_http(route, method, status, took);
    // The template, not the path or the query: nothing a caller sends verbatim is logged.
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    tracing::debug!(method, route, status, micros, "request");
    response
}

type Handled = Result<Response<Bytes>, ApiError>;

/// A request's body, not yet read, and the connection whose turn reading it takes.
struct Body<'a> {
    incoming: Incoming,
    connection: &'a Connection,
}

async fn dispatch(app: &Arc<App>, connection: &Connection, head: Head, body: Incoming) -> Handled {
    let body = Body {
        incoming: body,
        connection,
    };
    let Head {
        method,
        path,
        query,
        token,
        allowed_origin,
        preflight,
    } = head;
    let route = Route::resolve(&path).ok_or(ApiError::NotFound("route"))?;
    if preflight && allowed_origin.is_some() && route.is_ui() {
        return Ok(preflight_answer(route));
    }
    // HEAD is answered as GET; hyper sends the head of the answer without its body.
    let method = match method {
        Method::HEAD => Method::GET,
        other => other,
    };
    match (&method, route) {
        (&Method::GET, Route::Page) => Ok(crate::web::page()),
        (&Method::GET, Route::Asset(name)) => {
            crate::web::asset(name).ok_or(ApiError::NotFound("asset"))
        }
        (&Method::GET, Route::OpenApi) => Ok(crate::web::openapi()),
        (&Method::GET, Route::Healthz) => Ok(json::json(StatusCode::OK, &json::OK)),
        (&Method::GET, Route::Readyz) => {
            app.blocking(|app| Ok(app.store.ping()?)).await?;
            Ok(json::json(StatusCode::OK, &json::OK))
        }
        // Served on a listener of its own instead (`--metrics-listen`).
        (&Method::GET, Route::Metrics) if app.metrics_elsewhere => Err(ApiError::NotFound("route")),
        (&Method::GET, Route::Metrics) => metrics(app, token).await,
        // Each route with a body checks its token before reading the body: a caller
        // without a valid token cannot make the server wait for, or hold, its body.
        (&Method::POST, Route::Runtimes) => create_runtime(app, token, body).await,
        (&Method::GET, Route::Runtimes) => list_runtimes(app, token, query.as_deref()).await,
        (&Method::DELETE, Route::Runtime(rt)) => delete_runtime(app, token, rt).await,
        (&Method::POST, Route::Create(rt, Kind::Models)) => {
            create_request(app, token, rt, body).await
        }
        (&Method::POST, Route::Create(rt, kind)) => create_of(app, token, rt, kind, body).await,
        (&Method::GET, Route::Read(rt, kind, id)) => {
            let wait_ms = wire::parse_wait_query(query.as_deref())?;
            get_request(app, token, rt, kind, id, wait_ms).await
        }
        (&Method::POST, Route::DaemonToken(rt)) => rotate_daemon_token(app, token, rt).await,
        (&Method::POST, Route::Heartbeat) => heartbeat(app, token, body).await,
        (&Method::POST, Route::Result(rt, kind, id)) => {
            report(app, token, rt, kind, id, body).await
        }
        (_, route) => Err(ApiError::MethodNotAllowed(route.allowed())),
    }
}

/// The longest a body may take to arrive after its headers, however long `--read-timeout`.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to a CORS preflight from a listed origin, for a UI route: which methods and
/// headers its page may use. `handle` adds the origin itself.
fn preflight_answer(route: Route<'_>) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static(route.allowed()),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static("authorization, content-type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        header::HeaderValue::from_static("600"),
    );
    response
}

/// The whole body, or 413 once it passes the limit (checked as it streams in, so a large
/// body is refused without being held in memory), or 408 when it has not all arrived
/// within [`BODY_TIMEOUT`] (or `--read-timeout`, if shorter) of its headers. One body at
/// a time per connection.
async fn read_body(app: &App, body: Body<'_>) -> Result<Bytes, ApiError> {
    read_body_within(app, body, app.settings.body_limit).await
}

/// [`read_body`] with another limit than the body limit.
async fn read_body_within(app: &App, body: Body<'_>, limit: usize) -> Result<Bytes, ApiError> {
    let deadline = BODY_TIMEOUT.min(app.settings.read_timeout);
    // The wait for the connection's turn counts toward the deadline: a body that cannot
    // be read in time is a 408 whatever held it up.
    let read = async {
        let _turn = body.connection.body_turn().await;
        Limited::new(body.incoming, limit).collect().await
    };
    let collected = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ApiError::RequestTimeout)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(e) => Err(ApiError::BadRequest(format!("could not read body: {e}"))),
    }
}

/// A UI caller, known by its API token. Found by a read (which may run on an async
/// worker); recording the use is a write, made apart by [`Caller::note_use`].
struct Caller {
    workspace: WorkspaceId,
    token: TokenHash,
    /// What the store said of the token, `last_used_at` included.
    found: ApiTokenUse,
}

/// The caller of a UI route; read-only, and no clock: it may run on an async worker.
/// Tokens are looked up in the store on every call and never cached, so a revoked token is
/// refused at once by every instance.
fn caller_of(app: &App, token: Option<&Token>) -> Result<Caller, ApiError> {
    let token = token.ok_or(ApiError::Unauthorized)?.hash();
    let found = app
        .store
        .api_token_use(&token)?
        .ok_or(ApiError::Unauthorized)?;
    Ok(Caller {
        workspace: found.workspace,
        found,
        token,
    })
}

impl Caller {
    /// Records the token's use when its `last_used_at` is due (at most once a minute per
    /// token, so a UI call is not a write). Only where a write may run: the blocking pool.
    fn note_use(&self, app: &App) -> Result<(), ApiError> {
        let now = app.clock.now();
        if self.found.touch_due(now) {
            app.store.touch_api_token(&self.token, now)?;
        }
        Ok(())
    }
}

/// The caller's workspace, its use recorded: for handlers already on the blocking pool.
fn workspace_of(app: &App, token: Option<&Token>) -> Result<WorkspaceId, ApiError> {
    let caller = caller_of(app, token)?;
    caller.note_use(app)?;
    Ok(caller.workspace)
}

fn daemon_of(app: &App, token: &TokenHash) -> Result<Daemon, ApiError> {
    app.store
        .daemon_by_token(token)?
        .ok_or(ApiError::Unauthorized)
}

fn parse_runtime_id(s: &str) -> Result<RuntimeId, ApiError> {
    RuntimeId::parse(s).ok_or(ApiError::NotFound("runtime"))
}

fn parse_request_id(s: &str) -> Result<RequestId, ApiError> {
    RequestId::parse(s).ok_or(ApiError::NotFound("request"))
}

async fn create_runtime(app: &Arc<App>, token: Option<Token>, body: Body<'_>) -> Handled {
    let caller = app.read(move |app| caller_of(app, token.as_ref())).await?;
    let body = read_body(app, body).await?;
    let new = wire::parse_new_runtime(&body)?;
    let daemon_token = Token::new_daemon()?;
    let id = RuntimeId::random()?;
    let (runtime, daemon_token) = app
        .blocking(move |app| {
            caller.note_use(app)?;
            let workspace_id = caller.workspace;
            let max = app.settings.max_runtimes_per_workspace;
            let runtime = app.store.create_runtime_within(
                &NewRuntime {
                    id,
                    workspace_id,
                    name: new.name,
                    provider: new.provider,
                    daemon_token: daemon_token.hash(),
                },
                app.clock.now(),
                max,
            )?;
            let runtime = runtime.ok_or_else(|| {
                ApiError::Conflict(format!(
                    "this workspace has {max} runtimes, the most allowed: delete one first"
                ))
            })?;
            Ok((runtime, daemon_token))
        })
        .await?;
    tracing::info!(runtime = %runtime.id, "runtime created");
    Ok(json::json(
        StatusCode::CREATED,
        &RuntimeRecord::new(&runtime, false, Some(&daemon_token)),
    ))
}

async fn list_runtimes(app: &Arc<App>, token: Option<Token>, query: Option<&str>) -> Handled {
    let page = wire::parse_page_query(query);
    let (mut runtimes, limit, now) = app
        .blocking(move |app| {
            // The token first: a caller without one learns nothing, not even about its query.
            let workspace = workspace_of(app, token.as_ref())?;
            let (limit, after) = page?;
            // One more than the page: whether it is there says whether a next page is.
            let runtimes = app.store.list_runtimes(workspace, after, limit + 1)?;
            Ok((runtimes, limit, app.clock.now()))
        })
        .await?;
    let next_cursor = if runtimes.len() > limit {
        runtimes.truncate(limit);
        runtimes
            .last()
            .map(|last| wire::encode_cursor(RuntimeCursor::after(last)))
    } else {
        None
    };
    let offline_after = app.settings.offline_after;
    let list = RuntimeList {
        runtimes: runtimes
            .iter()
            .map(|r| RuntimeRecord::new(r, r.is_online(now, offline_after), None))
            .collect(),
        next_cursor,
    };
    Ok(json::json(StatusCode::OK, &list))
}

async fn delete_runtime(app: &Arc<App>, token: Option<Token>, rt: &str) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let deleted = app
        .blocking(move |app| {
            let workspace = workspace_of(app, token.as_ref())?;
            Ok(app.store.delete_runtime(workspace, rt)?)
        })
        .await?;
    if !deleted {
        return Err(ApiError::NotFound("runtime"));
    }
    tracing::info!(runtime = %rt, "runtime deleted");
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// A new daemon token for the runtime, shown once; the old one is unknown from the
/// moment the store has the new one, on every instance (daemon tokens are not cached).
async fn rotate_daemon_token(app: &Arc<App>, token: Option<Token>, rt: &str) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let daemon_token = Token::new_daemon()?;
    let hash = daemon_token.hash();
    let rotated = app
        .blocking(move |app| {
            let workspace = workspace_of(app, token.as_ref())?;
            Ok(app.store.rotate_daemon_token(workspace, rt, &hash)?)
        })
        .await?;
    if !rotated {
        return Err(ApiError::NotFound("runtime"));
    }
    tracing::info!(runtime = %rt, "daemon token rotated");
    Ok(json::json(
        StatusCode::OK,
        &wire::DaemonTokenRecord {
            daemon_token: daemon_token.expose(),
        },
    ))
}

async fn create_request(app: &Arc<App>, token: Option<Token>, rt: &str, body: Body<'_>) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let caller = app.read(move |app| caller_of(app, token.as_ref())).await?;
    let refresh = wire::parse_ask(&read_body(app, body).await?)?;
    let (id, cached) = (RequestId::random()?, RequestId::random()?);
    let asked = app
        .blocking(move |app| {
            caller.note_use(app)?;
            let workspace = caller.workspace;
            let runtime = app
                .store
                .find_runtime(workspace, rt)?
                .ok_or(ApiError::NotFound("runtime"))?;
            let now = app.clock.now();
            let settings = &app.settings;
            let ask = Ask {
                id,
                cached,
                refresh,
                reuse_after: now.saturating_sub(millis(settings.retention.of(Kind::Models)) / 2),
                max_stored: settings.max_requests_per_workspace,
                online: runtime.is_online(now, settings.offline_after),
                fresh: millis(settings.catalog_fresh),
                serve: millis(settings.catalog_serve),
            };
            Ok(app.store.ask_for_models(&runtime, &ask, now)?)
        })
        .await?;
    let (answer, created) = match asked {
        Asked::Cached {
            answer,
            stale,
            refresh,
        } => {
            let started = refresh.filter(|r| r.request.id == id);
            app.metrics.answered_from_catalog(stale, started.is_some());
            (*answer, started)
        }
        Asked::Discovery(created) => {
            let request = created.request.clone();
            (request, Some(created).filter(|c| c.request.id == id))
        }
        Asked::Offline => return Err(ApiError::RuntimeOffline),
        Asked::Full => {
            let max = app.settings.max_requests_per_workspace;
            return Err(ApiError::TooManyStored(max));
        }
        Asked::NoRuntime => return Err(ApiError::NotFound("runtime")),
    };
    if created.is_some() {
        tracing::info!(request = %id, runtime = %rt, "request created");
        app.waiters.wake_runtime(rt, Source::Local);
    }
    Ok(json::json(StatusCode::OK, &RequestRecord::from(&answer)))
}

/// The UI's create of a request of any kind but `models` (whose create knows the catalog):
/// a new pending request, or the runtime's active one of that kind and key, or 409 where
/// the kind refuses a second one.
async fn create_of(
    app: &Arc<App>,
    token: Option<Token>,
    rt: &str,
    kind: Kind,
    body: Body<'_>,
) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let caller = app.read(move |app| caller_of(app, token.as_ref())).await?;
    let input = kinds::parse_input(kind, &read_body(app, body).await?)?;
    let id = RequestId::random()?;
    let new = NewRequest {
        id,
        kind,
        key: input.key,
        input: input.json,
    };
    let created = app
        .blocking(move |app| {
            caller.note_use(app)?;
            let runtime = app
                .store
                .find_runtime(caller.workspace, rt)?
                .ok_or(ApiError::NotFound("runtime"))?;
            let now = app.clock.now();
            let settings = &app.settings;
            if !runtime.is_online(now, settings.offline_after) {
                return Err(ApiError::RuntimeOffline);
            }
            let max = settings.max_requests_per_workspace;
            match app.store.create_or_coalesce_within(rt, &new, now, max)? {
                Added::Done(created) => Ok(created),
                Added::Full => Err(ApiError::TooManyStored(max)),
                Added::Missing => Err(ApiError::NotFound("runtime")),
            }
        })
        .await?;
    let request = created.request;
    if request.id == id {
        let kind = kind.name();
        tracing::info!(request = %id, runtime = %rt, kind, "request created");
        app.waiters.wake_runtime(rt, Source::Local);
    } else if let Coalesce::Refuse(message) = kind.spec().coalesce {
        return Err(ApiError::Conflict(message.to_owned()));
    }
    Ok(json::json(StatusCode::OK, &RequestRecord::from(&request)))
}

/// How long a waiting call asking for `wait_ms` is held: never past `--max-wait`, and
/// never so long that its runtime could go offline meanwhile (a held heartbeat keeps its
/// runtime online; `last_seen_at` may already be a tenth of `offline_after` old).
fn hold_for(app: &App, wait_ms: u64) -> Duration {
    let offline_after = app.settings.offline_after;
    Duration::from_millis(wait_ms)
        .min(app.settings.max_wait)
        .min(offline_after.saturating_sub(offline_after / 5))
}

/// Waits until `notified` fires, `until` passes or shutdown begins; true if woken.
async fn woken_before(
    app: &App,
    notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    until: tokio::time::Instant,
) -> bool {
    tokio::select! {
        () = notified => true,
        () = tokio::time::sleep_until(until) => false,
        () = app.shutdown_begun() => false,
    }
}

async fn get_request(
    app: &Arc<App>,
    token: Option<Token>,
    rt: &str,
    kind: Kind,
    id: &str,
    wait_ms: u64,
) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let id = parse_request_id(id)?;
    let token = token.ok_or(ApiError::Unauthorized)?.hash();
    let hold = hold_for(app, wait_ms);
    let first = read_request(app, &token, rt, kind, id).await?;
    if hold.is_zero() || first.status.is_terminal() || app.is_shutting_down() {
        return Ok(json::json(StatusCode::OK, &RequestRecord::from(&first)));
    }
    let until = tokio::time::Instant::now() + hold;
    // The workspace whose share the read takes: its token's (read apart, and only for a
    // call that waits, so that a plain read costs no more than before).
    let lookup = token.clone();
    let workspace = app
        .read(move |app| {
            let found = app.store.api_token_use(&lookup)?;
            Ok(found.ok_or(ApiError::Unauthorized)?.workspace)
        })
        .await?;
    let mut held = app.waiters.hold_read(id, workspace)?;
    held.waits_to_leave(first.status);
    let notify = held.notify();
    let mut notified = std::pin::pin!(notify.notified());
    // Read again now that it is registered: a change made since the first read is seen
    // here, and any later one wakes it.
    let mut request = read_request(app, &token, rt, kind, id).await?;
    while request.status == first.status {
        held.parked();
        let woken = woken_before(app, notified.as_mut(), until).await;
        notified.set(notify.notified());
        // Read again in either case: at the end of the wait the answer is the record as
        // it is now, not as it was when the call arrived.
        request = read_request(app, &token, rt, kind, id).await?;
        if !woken {
            break;
        }
    }
    Ok(json::json(StatusCode::OK, &RequestRecord::from(&request)))
}

/// A web-UI read of one request of `kind`, from its API token, with its deadline applied.
/// A request of another kind is not found: each kind's ids are read on its own route.
async fn read_request(
    app: &Arc<App>,
    token: &TokenHash,
    rt: RuntimeId,
    kind: Kind,
    id: RequestId,
) -> Result<StoredRequest, ApiError> {
    let token = token.clone();
    let (request, ended_here) = app
        .read_then(
            move |app| {
                let now = app.clock.now();
                let found = app.store.find_request_by_token(&token, rt, id)?;
                // An overdue request must be ended: a write.
                let overdue = matches!(&found, Scoped::Found(Some(r)) if r.is_overdue(now));
                Ok(((token, found, now), overdue))
            },
            move |app, (token, found, now)| {
                let (found, ended_here) = match found {
                    Scoped::Found(Some(r)) if r.is_overdue(now) => {
                        (app.store.get_request_by_token(&token, rt, id, now)?, true)
                    }
                    found => (found, false),
                };
                match found {
                    Scoped::Unauthorized => Err(ApiError::Unauthorized),
                    Scoped::NoRuntime => Err(ApiError::NotFound("runtime")),
                    Scoped::Found(request) => request
                        .filter(|r| r.kind == kind)
                        .map(|r| (r, ended_here))
                        .ok_or(ApiError::NotFound("request")),
                }
            },
        )
        .await?;
    if ended_here {
        app.waiters.wake_request(id, Source::Local);
    }
    Ok(request)
}

async fn heartbeat(app: &Arc<App>, token: Option<Token>, body: Body<'_>) -> Handled {
    // Only a tenth of offline_after of staleness: a runtime still goes offline between 0.9
    // and 1 × offline_after after its last heartbeat.
    let refresh_after = crate::clock::millis(app.settings.offline_after) / 10;
    let token = token.ok_or(ApiError::Unauthorized)?.hash();
    let daemon_token = token.clone();
    let daemon = app.read(move |app| daemon_of(app, &daemon_token)).await?;
    let body = read_body(app, body).await?;
    let beat = wire::parse_heartbeat(&body)?;
    if beat.runtime_id != daemon.runtime {
        return Err(ApiError::NotFound("runtime"));
    }
    let rt = daemon.runtime;
    let hold = hold_for(app, beat.wait_ms);
    let now = app.clock.now();
    // The common heartbeat (seen lately, nothing pending, nothing lost) writes nothing and
    // makes no store call past the read above.
    let batches = beat.batches;
    let handed = if daemon.heartbeat_writes(now, refresh_after, beat.working_on.as_deref()) {
        app.blocking(move |app| {
            let working_on = beat.working_on.as_deref();
            match app
                .store
                .heartbeat(&daemon, now, refresh_after, working_on, batches)?
            {
                Heartbeat::UnknownRuntime => Err(ApiError::NotFound("runtime")),
                Heartbeat::Alive(handed) => Ok(handed),
            }
        })
        .await?
    } else {
        Vec::new()
    };
    let handed = match handed {
        handed if !handed.is_empty() => handed,
        none if hold.is_zero() || app.is_shutting_down() => none,
        _ => hold_heartbeat(app, token, rt, hold, batches).await?,
    };
    for h in &handed {
        let kind = h.kind.name();
        tracing::info!(request = %h.id, runtime = %rt, kind, "request claimed");
        app.waiters.wake_request(h.id, Source::Local);
    }
    Ok(json::json(
        StatusCode::OK,
        &HeartbeatAck::new(&handed, batches),
    ))
}

/// Holds a heartbeat that claimed nothing until a request of its runtime becomes pending
/// (then claims it), `hold` passes, or shutdown begins.
async fn hold_heartbeat(
    app: &Arc<App>,
    token: TokenHash,
    rt: RuntimeId,
    hold: Duration,
    batches: bool,
) -> Result<Vec<Handed>, ApiError> {
    let until = tokio::time::Instant::now() + hold;
    let mut held = app.waiters.hold_heartbeat(rt)?;
    let notify = held.notify();
    let mut notified = std::pin::pin!(notify.notified());
    loop {
        // First right after registering: a request made between the heartbeat's own
        // claim and the registration is not missed.
        let handed = claim_if_pending(app, &token, rt, batches).await?;
        if !handed.is_empty() {
            return Ok(handed);
        }
        held.parked();
        if !woken_before(app, notified.as_mut(), until).await {
            return Ok(handed);
        }
        notified.set(notify.notified());
    }
}

/// One read (is a request of any kind pending for this daemon's runtime?) and, only if
/// so, the claims.
async fn claim_if_pending(
    app: &Arc<App>,
    token: &TokenHash,
    rt: RuntimeId,
    batches: bool,
) -> Result<Vec<Handed>, ApiError> {
    let token = token.clone();
    app.read_then(
        move |app| {
            let daemon = daemon_of(app, &token)?;
            if daemon.runtime != rt {
                return Err(ApiError::NotFound("runtime"));
            }
            let pending = daemon.any_pending();
            Ok((daemon, pending))
        },
        // `read_then` runs this step whatever the read said (in place when it writes
        // nothing): it must look at the read's answer itself.
        move |app, daemon| {
            let mut handed = Vec::new();
            if daemon.any_pending() {
                let now = app.clock.now();
                app.store
                    .claim_pending(&daemon, now, batches, &mut handed)?;
            }
            Ok(handed)
        },
    )
    .await
}

async fn report(
    app: &Arc<App>,
    token: Option<Token>,
    rt: &str,
    kind: Kind,
    id: &str,
    body: Body<'_>,
) -> Handled {
    let rt = parse_runtime_id(rt)?;
    let id = parse_request_id(id)?;
    let token = token.ok_or(ApiError::Unauthorized)?.hash();
    let daemon = app.read(move |app| daemon_of(app, &token)).await?;
    if daemon.runtime != rt {
        return Err(ApiError::NotFound("runtime"));
    }
    let settings = &app.settings;
    // An import carries the skill's files: the one body allowed past the body limit.
    let limit = match kind {
        Kind::SkillImport => settings.max_import_bytes.max(settings.body_limit),
        _ => settings.body_limit,
    };
    let body = read_body_within(app, body, limit).await?;
    let report = match kind {
        Kind::Models => wire::parse_report_within(&body, settings.max_models_per_report)?,
        kind => kinds::parse_result(kind, &body)?,
    };
    let ended = matches!(report, Report::Ended(_));
    let outcome = app
        .blocking(move |app| {
            let now = app.clock.now();
            Ok(app.store.report(rt, kind, id, &report, now)?)
        })
        .await?;
    if ended && outcome == ReportOutcome::Recorded {
        app.waiters.wake_request(id, Source::Local);
    }
    match outcome {
        ReportOutcome::Recorded | ReportOutcome::Replayed => {
            tracing::info!(request = %id, ?outcome, "report accepted");
            Ok(json::json(StatusCode::OK, &json::OK))
        }
        ReportOutcome::NotFound => Err(ApiError::NotFound("request")),
        ReportOutcome::NotRunning(status) => Err(ApiError::Conflict(format!(
            "request is {}, not running",
            status.as_str()
        ))),
    }
}

/// The answer of the metrics listener (`--metrics-listen`): `/metrics` and nothing else.
pub async fn metrics_only(app: Arc<App>, request: Request<Incoming>) -> Response<Bytes> {
    let token = wire::bearer(request.headers().get(header::AUTHORIZATION));
    let answer = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(&app, token).await,
        (_, "/metrics") => Err(ApiError::MethodNotAllowed("GET, HEAD")),
        _ => Err(ApiError::NotFound("route")),
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// `GET /metrics`: open like `/healthz` unless `--metrics-token` is set. The store's gauges
/// are the sweeper's last count, left out when that count failed (the rest still explains
/// the outage).
async fn metrics(app: &Arc<App>, token: Option<Token>) -> Handled {
    if let Some(wanted) = &app.metrics_token
        && token.is_none_or(|t| !constant_time_eq(t.expose().as_bytes(), wanted.as_bytes()))
    {
        return Err(ApiError::Unauthorized);
    }
    // From memory: the sweeper counted the stored requests; a scrape never reaches the store,
    // and scrapes that come together share one rendering.
    let text = app
        .metrics
        .scrape(|| app.clock.now())
        .await
        .map_err(ApiError::Internal)?;
    let mut response = Response::new(text);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(response)
}

/// Equality whose time does not depend on where two byte strings first differ, so that a
/// caller cannot find the metrics token a byte at a time by timing its guesses.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::Route;
    use crate::kind::Kind;

    #[test]
    fn paths_resolve_to_routes_and_nothing_else_does() {
        assert_eq!(Route::resolve("/healthz"), Some(Route::Healthz));
        assert_eq!(Route::resolve("/"), Some(Route::Page));
        assert_eq!(
            Route::resolve("/assets/app.js"),
            Some(Route::Asset("app.js"))
        );
        assert_eq!(Route::resolve("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::resolve("/api/runtimes"), Some(Route::Runtimes));
        assert_eq!(Route::resolve("/api/runtimes/a"), Some(Route::Runtime("a")));
        assert_eq!(
            Route::resolve("/api/runtimes/a/models/b"),
            Some(Route::Read("a", Kind::Models, "b"))
        );
        assert_eq!(
            Route::resolve("/api/daemon/runtimes/a/models/b/result"),
            Some(Route::Result("a", Kind::Models, "b"))
        );
        // A create's exact path wins over a read of the shorter kind's path.
        assert_eq!(
            Route::resolve("/api/runtimes/a/local-skills/import"),
            Some(Route::Create("a", Kind::SkillImport))
        );
        assert_eq!(
            Route::resolve("/api/runtimes/a/local-skills/b"),
            Some(Route::Read("a", Kind::LocalSkills, "b"))
        );
        assert_eq!(
            Route::resolve("/api/runtimes/a/local-skills/import/b"),
            Some(Route::Read("a", Kind::SkillImport, "b"))
        );
        assert_eq!(
            Route::resolve("/api/daemon/runtimes/a/update/b/result"),
            Some(Route::Result("a", Kind::Update, "b"))
        );
        assert_eq!(
            Route::resolve("/api/runtimes/a/daemon-token"),
            Some(Route::DaemonToken("a"))
        );
        for none in [
            "/api/runtimes/a/daemon-token/b",
            "/api/daemon/runtimes/a/daemon-token",
            "",
            "healthz",
            "/healthz/",
            "/api/runtimes/",
            "/api/runtimes/a/models/b/c",
            "/api/runtimes/a/local-skills/import/b/c",
            "/api/daemon/runtimes/a/local-skills/result",
            "/api/daemon/runtimes/a/update/result",
            "/api/daemon",
            "//healthz",
        ] {
            assert_eq!(Route::resolve(none), None, "{none:?}");
        }
    }
}
