//! `openapi.yaml` and the router describe the same API: every path of the document is a
//! route with the same methods, and every route is in the document.

use std::collections::BTreeMap;

use model_relay::http::Route;
use model_relay::kind::Kind;
use serde_yaml_ng::Value;

/// One example of every route, with a path that resolves to it. The `match` has no
/// wildcard, so a new `Route` variant does not compile until it is listed here too.
fn every_route() -> Vec<(Route<'static>, String)> {
    let mut examples: Vec<(Route<'static>, String)> = [
        (Route::Page, "/"),
        (Route::Asset("app.js"), "/assets/app.js"),
        (Route::OpenApi, "/openapi.yaml"),
        (Route::Healthz, "/healthz"),
        (Route::Readyz, "/readyz"),
        (Route::Metrics, "/metrics"),
        (Route::Runtimes, "/api/runtimes"),
        (Route::Runtime("r"), "/api/runtimes/r"),
        (Route::DaemonToken("r"), "/api/runtimes/r/daemon-token"),
        (Route::Heartbeat, "/api/daemon/heartbeat"),
    ]
    .map(|(route, path)| (route, path.to_owned()))
    .into();
    // Every kind's three routes.
    for kind in Kind::ALL {
        let path = kind.spec().path;
        examples.extend([
            (Route::Create("r", kind), format!("/api/runtimes/r/{path}")),
            (
                Route::Read("r", kind, "q"),
                format!("/api/runtimes/r/{path}/q"),
            ),
            (
                Route::Result("r", kind, "q"),
                format!("/api/daemon/runtimes/r/{path}/q/result"),
            ),
        ]);
    }
    for (route, _) in &examples {
        match route {
            Route::Page
            | Route::Asset(_)
            | Route::OpenApi
            | Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::Runtimes
            | Route::Runtime(_)
            | Route::Create(..)
            | Route::Read(..)
            | Route::DaemonToken(_)
            | Route::Heartbeat
            | Route::Result(..) => {}
        }
    }
    examples
}

/// Path template → its methods, upper case and sorted, as the document lists them.
fn documented() -> BTreeMap<String, Vec<String>> {
    let doc: Value = serde_yaml_ng::from_str(include_str!("../openapi.yaml")).unwrap();
    let paths = doc["paths"].as_mapping().expect("paths is a mapping");
    paths
        .iter()
        .map(|(path, item)| {
            let mut methods: Vec<String> = item
                .as_mapping()
                .unwrap()
                .keys()
                .filter_map(Value::as_str)
                .filter(|k| ["get", "post", "put", "patch", "delete", "head"].contains(k))
                .map(str::to_uppercase)
                .collect();
            methods.sort();
            (path.as_str().unwrap().to_owned(), methods)
        })
        .collect()
}

fn routed() -> BTreeMap<String, Vec<String>> {
    every_route()
        .into_iter()
        .map(|(route, example)| {
            assert_eq!(Route::resolve(&example), Some(route), "{example}");
            // HEAD is served wherever GET is (DESIGN.md), and not listed path by path.
            let mut methods: Vec<String> = route
                .allowed()
                .split(", ")
                .filter(|m| *m != "HEAD")
                .map(str::to_owned)
                .collect();
            methods.sort();
            (route.template().to_owned(), methods)
        })
        .collect()
}

#[test]
fn every_route_is_documented_with_its_methods() {
    let documented = documented();
    for (template, methods) in routed() {
        assert_eq!(
            documented.get(&template),
            Some(&methods),
            "route {template} in openapi.yaml"
        );
    }
}

#[test]
fn every_documented_path_is_a_route() {
    let routed = routed();
    for (path, methods) in documented() {
        assert_eq!(
            routed.get(&path),
            Some(&methods),
            "openapi.yaml path {path}"
        );
    }
}

#[test]
fn every_documented_operation_answers_errors_in_the_error_shape() {
    let doc: Value = serde_yaml_ng::from_str(include_str!("../openapi.yaml")).unwrap();
    let responses = &doc["components"]["responses"];
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, op) in item.as_mapping().unwrap() {
            let Some(answers) = op.get("responses").and_then(Value::as_mapping) else {
                continue;
            };
            for (status, answer) in answers {
                let status = status.as_str().unwrap();
                if !status.starts_with('4') && !status.starts_with('5') {
                    continue;
                }
                // A reference to a shared response, or the response itself.
                let answer = match answer.get("$ref").and_then(Value::as_str) {
                    Some(r) => &responses[r.trim_start_matches("#/components/responses/")],
                    None => answer,
                };
                let schema = &answer["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema.as_str(),
                    Some("#/components/schemas/Error"),
                    "{method:?} {path:?} {status}"
                );
            }
        }
    }
}
