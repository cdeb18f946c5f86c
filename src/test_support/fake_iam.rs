//! A fake IAM endpoint for unit tests: the roles it holds (name, path,
//! tags), IAM's Query API answers for the calls ephemera makes, and the
//! calls in the order they came. Real IAM and STS are the e2e tests' (MiniStack).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};

use crate::cloud::aws::AwsProvider;

/// One call: the action and the role and policy it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub action: String,
    pub role: String,
    pub policy: String,
}

#[derive(Default)]
struct State {
    /// Role name -> (path, tags).
    roles: BTreeMap<String, (String, Vec<(String, String)>)>,
    calls: Vec<Call>,
}

/// The fake, serving until dropped.
pub struct FakeIam {
    url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIam {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIam {
    pub async fn start() -> FakeIam {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, state.clone()));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        FakeIam { url, state, task }
    }

    /// A provider whose IAM (and STS) calls come here.
    pub async fn provider(&self) -> AwsProvider {
        AwsProvider::for_endpoint(&self.url).await
    }

    /// Holds role `name` under `path` with `tags`.
    pub fn add_role(&self, name: &str, path: &str, tags: &[(&str, &str)]) {
        let tags = tags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.state.lock().unwrap().roles.insert(name.to_owned(), (path.to_owned(), tags));
    }

    pub fn has_role(&self, name: &str) -> bool {
        self.state.lock().unwrap().roles.contains_key(name)
    }

    /// The calls so far, as `Action` or `Action:PolicyName`.
    pub fn calls(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .calls
            .iter()
            .map(|c| if c.policy.is_empty() { c.action.clone() } else { format!("{}:{}", c.action, c.policy) })
            .collect()
    }
}

fn form(body: &str, key: &str) -> String {
    body.split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace("%2F", "/").replace("%3A", ":"))
        .unwrap_or_default()
}

fn tags_xml(tags: &[(String, String)]) -> String {
    use std::fmt::Write;
    tags.iter().fold(String::new(), |mut out, (k, v)| {
        let _ = write!(out, "<member><Key>{k}</Key><Value>{v}</Value></member>");
        out
    })
}

fn role_xml(name: &str, path: &str, tags: &[(String, String)]) -> String {
    let tags = tags_xml(tags);
    format!(
        "<Path>{path}</Path><RoleName>{name}</RoleName><RoleId>AROA{name}</RoleId>\
         <Arn>arn:aws:iam::111122223333:role{path}{name}</Arn><CreateDate>2026-11-23T10:00:00Z</CreateDate>\
         <Tags>{tags}</Tags>"
    )
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let (action, role, policy) = (form(&body, "Action"), form(&body, "RoleName"), form(&body, "PolicyName"));
    let mut state = state.lock().unwrap();
    state.calls.push(Call { action: action.clone(), role: role.clone(), policy });
    let no_such = || {
        let xml = format!(
            "<ErrorResponse><Error><Type>Sender</Type><Code>NoSuchEntity</Code>\
             <Message>The role with name {role} cannot be found.</Message></Error><RequestId>r</RequestId></ErrorResponse>"
        );
        Response::builder().status(404).body(Full::new(Bytes::from(xml))).unwrap()
    };
    let result = match action.as_str() {
        "ListRoles" => {
            let prefix = form(&body, "PathPrefix");
            let roles: Vec<String> = state
                .roles
                .iter()
                .filter(|(_, (path, _))| path.starts_with(&prefix))
                .map(|(name, (path, _))| format!("<member>{}</member>", role_xml(name, path, &[])))
                .collect();
            let roles = roles.concat();
            format!("<Roles>{roles}</Roles><IsTruncated>false</IsTruncated>")
        }
        "GetRole" => match state.roles.get(&role) {
            Some((path, tags)) => format!("<Role>{}</Role>", role_xml(&role, path, tags)),
            None => return Ok(no_such()),
        },
        "ListRoleTags" => match state.roles.get(&role) {
            Some((_, tags)) => format!("<Tags>{}</Tags><IsTruncated>false</IsTruncated>", tags_xml(tags)),
            None => return Ok(no_such()),
        },
        "ListAttachedRolePolicies" if state.roles.contains_key(&role) => {
            "<AttachedPolicies></AttachedPolicies><IsTruncated>false</IsTruncated>".to_owned()
        }
        "DeleteRole" if state.roles.remove(&role).is_some() => String::new(),
        "PutRolePolicy" | "DeleteRolePolicy" | "ListAttachedRolePolicies" | "DeleteRole"
            if !state.roles.contains_key(&role) =>
        {
            return Ok(no_such());
        }
        _ => String::new(),
    };
    let xml = format!(
        "<{action}Response xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><{action}Result>{result}</{action}Result>\
         <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></{action}Response>"
    );
    Ok(Response::builder().status(200).header("content-type", "text/xml").body(Full::new(Bytes::from(xml))).unwrap())
}
