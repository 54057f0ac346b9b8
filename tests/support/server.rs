//! An instance of the service on `127.0.0.1:0`, over the real `run` seam, and a small
//! HTTP client to talk to it.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use model_relay::clock::{Clock, FakeClock};
use model_relay::config::Settings;
use model_relay::http::Listener;
use model_relay::ids::{Token, WorkspaceId};
use model_relay::store::Storer;
use model_relay::{App, run};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A fixed start for the fake clock: 2026-05-01T09:19:21.000Z.
pub const T0: i64 = 1_777_627_161_000;

/// Test settings: the defaults, but a sweeper that never runs on its own, so that every
/// expiry a test sees comes from the request path it exercises.
pub fn settings() -> Settings {
    Settings {
        sweep_every: Duration::from_secs(3600),
        ..Settings::default()
    }
}

pub struct Instance {
    pub base: String,
    /// The instance's `App`, shared with its server.
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<std::io::Result<()>>>,
}

impl Instance {
    pub async fn start(store: Arc<dyn Storer>, clock: Arc<dyn Clock>, settings: Settings) -> Self {
        Self::start_app(App::new(store, clock, settings)).await
    }

    /// An instance of `app` as it is built (with CORS origins, say).
    pub async fn start_app(app: App) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        Self::serve(app, listener.into(), base)
    }

    /// An instance serving HTTPS with `config`, at `https://127.0.0.1:PORT`.
    pub async fn start_tls(app: App, config: Arc<rustls::ServerConfig>) -> Self {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}", tcp.local_addr().unwrap());
        Self::serve(app, Listener::tls(tcp, config), base)
    }

    fn serve(app: App, listener: Listener, base: String) -> Self {
        let app = Arc::new(app);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(run(listener, Arc::clone(&app), async {
            let _ = stopped.await;
        }));
        Instance {
            base,
            app,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Completes the instance's shutdown future; `run` starts shutting down.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether `run` has returned.
    pub fn has_stopped(&self) -> bool {
        self.served
            .as_ref()
            .is_none_or(|served| served.is_finished())
    }

    /// Stops the instance through its shutdown future and waits until `run` has returned.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }
}

/// A workspace made directly in the store, as `model-relay workspace create` does.
pub fn workspace(store: &dyn Storer, now: i64) -> (WorkspaceId, String) {
    let id = WorkspaceId::random().unwrap();
    let token = Token::new_api().unwrap();
    store
        .create_workspace(id, "ws", &token.hash(), now)
        .unwrap();
    (id, token.expose().to_owned())
}

impl RawAnswer {
    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// An answer: status, headers of interest, and the body as JSON (`Null` when empty).
pub struct Answer {
    pub status: StatusCode,
    pub allow: Option<String>,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub json: Value,
}

impl Default for Http {
    /// A client of plain `http://` servers only.
    fn default() -> Self {
        let tls = model_relay::tls::client_config_trusting_nothing().unwrap();
        Http::with_tls(tls)
    }
}

impl Http {
    /// A client of `https://` servers whose certificates the CA in `ca_cert` signed (and of
    /// plain `http://` ones).
    pub fn trusting(ca_cert: &std::path::Path) -> Self {
        Http::with_tls(model_relay::tls::client_config(Some(ca_cert)).unwrap())
    }

    fn with_tls(tls: rustls::ClientConfig) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Http {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// An answer as it came: status, content type, body text.
pub struct RawAnswer {
    pub status: StatusCode,
    pub allow: Option<String>,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub body: Bytes,
}

impl Http {
    /// One call; `Err` when no answer came (refused, reset, closed early, or nothing in 10 s).
    pub async fn try_raw(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<RawAnswer, String> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let text_header = |name| {
                response
                    .headers()
                    .get(name)
                    .map(|v: &header::HeaderValue| v.to_str().unwrap_or("<not text>").to_owned())
            };
            let allow = text_header(header::ALLOW);
            let content_type = text_header(header::CONTENT_TYPE);
            let cache_control = text_header(header::CACHE_CONTROL);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?
                .to_bytes();
            Ok(RawAnswer {
                status,
                allow,
                content_type,
                cache_control,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
    }

    /// One call whose answer is JSON (or empty); `Err` when no answer came or it is not JSON.
    pub async fn try_call(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let raw = self.try_raw(method, url, token, body).await?;
        let json = if raw.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw.body)
                .map_err(|e| format!("not JSON ({e}): {:?}", String::from_utf8_lossy(&raw.body)))?
        };
        Ok(Answer {
            status: raw.status,
            allow: raw.allow,
            content_type: raw.content_type,
            cache_control: raw.cache_control,
            json,
        })
    }

    /// One call whose answer is JSON (or empty); panics when no answer comes.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        self.try_call(method.clone(), url, token, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// `GET` of a text answer (the metrics).
    pub async fn get_text(&self, url: &str) -> RawAnswer {
        self.try_raw(Method::GET, url, None, None).await.unwrap()
    }

    pub async fn get(&self, url: &str, token: &str) -> Answer {
        self.call(Method::GET, url, Some(token), None).await
    }

    pub async fn post(&self, url: &str, token: &str, body: Value) -> Answer {
        self.call(
            Method::POST,
            url,
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn post_empty(&self, url: &str, token: &str) -> Answer {
        self.call(Method::POST, url, Some(token), None).await
    }
}

/// A fake clock at [`T0`], shared by every instance of a test.
pub fn clock() -> Arc<FakeClock> {
    Arc::new(FakeClock::new(T0))
}
