//! A fake apiserver for unit tests (tower-test): it answers a client's calls
//! in the order the code under test must make them, checking each request.

use http::{Request, Response};
use kube::{Client, client::Body};
use tower_test::mock::{Handle, pair};

pub type Apiserver = Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, Apiserver) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Expects `method path...` next, answers `body` (200), returns the request body.
pub async fn expect(
    handle: &mut Apiserver,
    method: &str,
    path_prefix: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    expect_status(handle, method, path_prefix, 200, body).await
}

/// [`expect`], answering with `status`.
pub async fn expect_status(
    handle: &mut Apiserver,
    method: &str,
    path_prefix: &str,
    status: u16,
    body: serde_json::Value,
) -> serde_json::Value {
    // Bounded: code under test that failed early (and still holds a client)
    // would otherwise leave the test waiting forever.
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request());
    let (request, responder) = next
        .await
        .unwrap_or_else(|_| panic!("no {method} {path_prefix} within 10 s: the code under test stopped short"))
        .expect("the code under test made another request");
    assert_eq!(request.method().as_str(), method, "{}", request.uri());
    assert!(request.uri().path().starts_with(path_prefix), "expected {path_prefix}, got {}", request.uri());
    let request_body = request.into_body().collect_bytes().await.unwrap();
    responder.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
    );
    serde_json::from_slice(&request_body).unwrap_or(serde_json::Value::Null)
}

/// Expects the calls `expected` (`method`, `path...`, answer), in any order
/// (the code under test makes them concurrently, or sends Events in the
/// background), answers each (200); returns the request bodies in the order
/// of `expected`.
pub async fn expect_each(
    handle: &mut Apiserver,
    expected: &[(&str, &str, serde_json::Value)],
) -> Vec<serde_json::Value> {
    let with_status: Vec<_> = expected.iter().map(|(m, p, b)| (*m, *p, 200, b.clone())).collect();
    expect_each_status(handle, &with_status).await
}

/// [`expect_each`], each answered with its status.
pub async fn expect_each_status(
    handle: &mut Apiserver,
    expected: &[(&str, &str, u16, serde_json::Value)],
) -> Vec<serde_json::Value> {
    let mut bodies = vec![None; expected.len()];
    for _ in expected {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request());
        let (request, responder) = next
            .await
            .unwrap_or_else(|_| panic!("not every call of {expected:?} within 10 s: the code under test stopped short"))
            .expect("the code under test made another request");
        let index = expected
            .iter()
            .enumerate()
            .position(|(i, (method, path, _, _))| {
                bodies[i].is_none() && request.method().as_str() == *method && request.uri().path().starts_with(path)
            })
            .unwrap_or_else(|| panic!("unexpected {} {}", request.method(), request.uri()));
        let request_body = request.into_body().collect_bytes().await.unwrap();
        let (_, _, status, answer) = &expected[index];
        responder.send_response(
            Response::builder().status(*status).body(Body::from(serde_json::to_vec(answer).unwrap())).unwrap(),
        );
        bodies[index] = Some(serde_json::from_slice(&request_body).unwrap_or(serde_json::Value::Null));
    }
    bodies.into_iter().map(Option::unwrap_or_default).collect()
}
