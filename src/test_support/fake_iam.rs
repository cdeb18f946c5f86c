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
    /// Managed policy ARN -> versions (id, document), the last the default.
    policies: BTreeMap<String, Vec<(String, String)>>,
    /// Versions made so far (their ids count up).
    versions_made: u64,
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

    /// The default version's document of managed policy `arn`.
    pub fn policy_document(&self, arn: &str) -> Option<serde_json::Value> {
        let state = self.state.lock().unwrap();
        state.policies.get(arn)?.last().map(|(_, doc)| serde_json::from_str(doc).unwrap())
    }

    /// How many versions managed policy `arn` keeps.
    pub fn policy_versions(&self, arn: &str) -> usize {
        self.state.lock().unwrap().policies.get(arn).map_or(0, Vec::len)
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
        .map(|v| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
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
    let no_such = || refusal(404, "NoSuchEntity", &format!("The role with name {role} cannot be found."));
    if let Some(answered) = policies(&action, &body, &mut state) {
        return Ok(match answered {
            Ok(result) => ok(&action, &result),
            Err(refusal) => refusal,
        });
    }
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
    Ok(ok(&action, &result))
}

/// IAM's answers for managed policies; `None` for any other action.
fn policies(action: &str, body: &str, state: &mut State) -> Option<Result<String, Response<Full<Bytes>>>> {
    let arn = form(body, "PolicyArn");
    let limit = |message: &str| refusal(409, "LimitExceeded", message);
    let result = match action {
        "CreatePolicy" => {
            let arn = format!("arn:aws:iam::111122223333:policy{}{}", form(body, "Path"), form(body, "PolicyName"));
            state.versions_made += 1;
            let id = format!("v{}", state.versions_made);
            state.policies.insert(arn.clone(), vec![(id, form(body, "PolicyDocument"))]);
            format!("<Policy><PolicyName>{}</PolicyName><Arn>{arn}</Arn></Policy>", form(body, "PolicyName"))
        }
        "ListPolicyVersions" => match state.policies.get(&arn) {
            Some(versions) => {
                let last = versions.len() - 1;
                let members: Vec<String> = versions
                    .iter()
                    .enumerate()
                    .map(|(i, (id, _))| {
                        format!(
                            "<member><VersionId>{id}</VersionId><IsDefaultVersion>{}</IsDefaultVersion>\
                             <CreateDate>2026-11-23T10:00:{i:02}Z</CreateDate></member>",
                            i == last
                        )
                    })
                    .collect();
                format!("<Versions>{}</Versions><IsTruncated>false</IsTruncated>", members.concat())
            }
            None => return Some(Err(no_such(&arn))),
        },
        "GetPolicyVersion" => {
            let id = form(body, "VersionId");
            match state.policies.get(&arn).and_then(|v| v.iter().find(|(i, _)| *i == id)) {
                Some((id, doc)) => {
                    let encoded =
                        percent_encoding::utf8_percent_encode(doc, percent_encoding::NON_ALPHANUMERIC).to_string();
                    format!("<PolicyVersion><Document>{encoded}</Document><VersionId>{id}</VersionId></PolicyVersion>")
                }
                None => return Some(Err(no_such(&arn))),
            }
        }
        "CreatePolicyVersion" => {
            state.versions_made += 1;
            let id = format!("v{}", state.versions_made);
            let document = form(body, "PolicyDocument");
            match state.policies.get_mut(&arn) {
                Some(versions) if versions.len() >= 5 => {
                    return Some(Err(limit("A managed policy can have up to 5 versions")));
                }
                Some(versions) => versions.push((id.clone(), document)),
                None => return Some(Err(no_such(&arn))),
            }
            format!(
                "<PolicyVersion><VersionId>{id}</VersionId><IsDefaultVersion>true</IsDefaultVersion></PolicyVersion>"
            )
        }
        "DeletePolicyVersion" => {
            let id = form(body, "VersionId");
            match state.policies.get_mut(&arn) {
                Some(versions) if versions.last().is_some_and(|(i, _)| *i == id) => {
                    return Some(Err(limit("Cannot delete the default version")));
                }
                Some(versions) => versions.retain(|(i, _)| *i != id),
                None => return Some(Err(no_such(&arn))),
            }
            String::new()
        }
        _ => return None,
    };
    Some(Ok(result))
}

fn no_such(name: &str) -> Response<Full<Bytes>> {
    refusal(404, "NoSuchEntity", &format!("{name} cannot be found."))
}

/// IAM's error answer.
fn refusal(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let xml = format!(
        "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>r</RequestId></ErrorResponse>"
    );
    Response::builder().status(status).body(Full::new(Bytes::from(xml))).unwrap()
}

fn ok(action: &str, result: &str) -> Response<Full<Bytes>> {
    let xml = format!(
        "<{action}Response xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><{action}Result>{result}</{action}Result>\
         <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></{action}Response>"
    );
    Response::builder().status(200).header("content-type", "text/xml").body(Full::new(Bytes::from(xml))).unwrap()
}
