//! The clusters the harness runs against: instances it can address by index, and stop and
//! start again mid-run.

use std::future::Future;
use std::sync::{Arc, RwLock};

use hyper::StatusCode;
use model_relay::clock::{Clock, SystemClock};
use model_relay::config::Settings;
use model_relay::ids::{RuntimeId, Token, WorkspaceId};
use model_relay::store::{NewRuntime, Storer};
use serde_json::json;
use tokio::sync::Mutex;

use super::Tenancy;
use crate::support::process::{Serve, workspace_create};
use crate::support::server::{Http, Instance};

pub trait Cluster: Send + Sync + 'static {
    fn size(&self) -> usize;
    /// Where instance `i` is listening (or was, while it restarts).
    fn base(&self, i: usize) -> String;
    /// Stops instance `i` (gracefully) and starts it again, on a new port.
    fn restart(&self, i: usize) -> impl Future<Output = ()> + Send;
}

/// Opens instance `i`'s store: a new handle (its own pool) on the shared database, or, for
/// the negative control, that instance's own memory store.
pub type Opener = Arc<dyn Fn(usize) -> Arc<dyn Storer> + Send + Sync>;

/// Instances of the service in this process, each with its own store handle and sweeper.
pub struct InProcess {
    open: Opener,
    settings: Settings,
    instances: Mutex<Vec<Option<Instance>>>,
    bases: RwLock<Vec<String>>,
}

impl InProcess {
    pub async fn start(size: usize, settings: Settings, open: Opener) -> Arc<Self> {
        let cluster = InProcess {
            open,
            settings,
            instances: Mutex::new(Vec::new()),
            bases: RwLock::new(Vec::new()),
        };
        for i in 0..size {
            let instance = cluster.start_one(i).await;
            cluster.bases.write().unwrap().push(instance.base.clone());
            cluster.instances.lock().await.push(Some(instance));
        }
        Arc::new(cluster)
    }

    async fn start_one(&self, i: usize) -> Instance {
        let open = self.open.clone();
        // Opening may connect to PostgreSQL, which must not happen on an async worker.
        let store = tokio::task::spawn_blocking(move || open(i))
            .await
            .expect("open a store");
        Instance::start(store, Arc::new(SystemClock), self.settings).await
    }

    pub async fn stop(&self) {
        for slot in self.instances.lock().await.iter_mut() {
            if let Some(instance) = slot.take() {
                instance.stop().await;
            }
        }
    }
}

impl Cluster for InProcess {
    fn size(&self) -> usize {
        self.bases.read().unwrap().len()
    }

    fn base(&self, i: usize) -> String {
        self.bases.read().unwrap()[i].clone()
    }

    async fn restart(&self, i: usize) {
        let mut instances = self.instances.lock().await;
        if let Some(old) = instances[i].take() {
            old.stop().await;
        }
        let new = self.start_one(i).await;
        self.bases.write().unwrap()[i] = new.base.clone();
        instances[i] = Some(new);
    }
}

/// One workspace and `runtimes` runtimes, written to every store in `stores` with the same
/// ids and tokens — as persistent records would be, even where requests are not shared.
pub fn tenancy_in(stores: &[Arc<dyn Storer>], runtimes: usize) -> Tenancy {
    let now = SystemClock.now();
    let workspace = WorkspaceId::random().unwrap();
    let api = Token::new_api().unwrap();
    let runtimes: Vec<(RuntimeId, Token)> = (0..runtimes)
        .map(|_| (RuntimeId::random().unwrap(), Token::new_daemon().unwrap()))
        .collect();
    for store in stores {
        store
            .create_workspace(workspace, "harness", &api.hash(), now)
            .unwrap();
        for (id, token) in &runtimes {
            let new = NewRuntime {
                id: *id,
                workspace_id: workspace,
                name: "runtime".into(),
                provider: "claude".into(),
                daemon_token: token.hash(),
            };
            store.create_runtime(&new, now).unwrap();
        }
    }
    Tenancy {
        api: api.expose().to_owned(),
        runtimes: runtimes
            .iter()
            .map(|(id, token)| (id.to_string(), token.expose().to_owned()))
            .collect(),
    }
}

/// `model-relay serve` processes of the built binary on one database.
pub struct Processes {
    database: String,
    flags: Vec<String>,
    servers: Mutex<Vec<Option<Serve>>>,
    bases: RwLock<Vec<String>>,
}

impl Processes {
    pub async fn start(size: usize, database: &str, flags: &[&str]) -> Arc<Self> {
        let cluster = Processes {
            database: database.to_owned(),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            servers: Mutex::new(Vec::new()),
            bases: RwLock::new(Vec::new()),
        };
        for _ in 0..size {
            let serve = cluster.spawn().await;
            cluster.bases.write().unwrap().push(serve.base.clone());
            cluster.servers.lock().await.push(Some(serve));
        }
        Arc::new(cluster)
    }

    async fn spawn(&self) -> Serve {
        let database = self.database.clone();
        let flags = self.flags.clone();
        tokio::task::spawn_blocking(move || {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Serve::start(&database, &flags)
        })
        .await
        .expect("start serve")
    }

    /// A workspace by the command line, runtimes over HTTP, as a user would make them.
    pub async fn tenancy(&self, runtimes: usize) -> Tenancy {
        let database = self.database.clone();
        let created = tokio::task::spawn_blocking(move || workspace_create(&database))
            .await
            .unwrap();
        let api = created["api_token"].as_str().unwrap().to_owned();
        let http = Http::default();
        let mut made = Vec::new();
        for _ in 0..runtimes {
            let url = format!("{}/api/runtimes", self.base(0));
            let answer = http
                .post(&url, &api, json!({"name": "runtime", "provider": "codex"}))
                .await;
            assert_eq!(answer.status, StatusCode::CREATED);
            made.push((
                answer.json["id"].as_str().unwrap().to_owned(),
                answer.json["daemon_token"].as_str().unwrap().to_owned(),
            ));
        }
        Tenancy {
            api,
            runtimes: made,
        }
    }

    /// SIGTERM to every process; each must exit 0.
    pub async fn stop(&self) {
        let servers: Vec<Serve> = self
            .servers
            .lock()
            .await
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        tokio::task::spawn_blocking(move || {
            for serve in servers {
                assert!(serve.terminate().success(), "serve exits 0 on SIGTERM");
            }
        })
        .await
        .unwrap();
    }
}

impl Cluster for Processes {
    fn size(&self) -> usize {
        self.bases.read().unwrap().len()
    }

    fn base(&self, i: usize) -> String {
        self.bases.read().unwrap()[i].clone()
    }

    async fn restart(&self, i: usize) {
        let mut servers = self.servers.lock().await;
        if let Some(old) = servers[i].take() {
            let status = tokio::task::spawn_blocking(move || old.terminate())
                .await
                .unwrap();
            assert!(status.success(), "serve exits 0 on SIGTERM");
        }
        let new = self.spawn().await;
        self.bases.write().unwrap()[i] = new.base.clone();
        servers[i] = Some(new);
    }
}
