//! The client commands: `submit` (optionally following the event with a live
//! progress line) and `status`. They talk HTTP to a running `spoold serve`.
//!
//! Exit codes: 0 the event was accepted (or, with --wait, succeeded); 1 it
//! failed, timed out or was cancelled; 2 the request itself failed (bad input,
//! server unreachable, unknown event).

use std::io::{IsTerminal, Read, Write};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::{ServerArg, StatusArgs, SubmitArgs};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn url(server: &str, path: &str) -> String {
    format!("{}{path}", server.trim_end_matches('/'))
}

/// A request to the server, carrying the token when there is one.
fn request(method: Method, to: &ServerArg, path: &str) -> hyper::http::request::Builder {
    let b = Request::builder().method(method).uri(url(&to.server, path));
    match &to.token {
        Some(t) => b.header("authorization", format!("Bearer {}", t.trim())),
        None => b,
    }
}

async fn send(
    c: &HttpClient,
    req: Request<Full<Bytes>>,
    server: &str,
) -> anyhow::Result<Response<Incoming>> {
    c.request(req).await.map_err(|e| anyhow!("cannot reach spoold at {server}: {e}; is `spoold serve` running there? (set --server or SPOOLD_SERVER)"))
}

async fn body_json(resp: Response<Incoming>) -> anyhow::Result<Value> {
    let bytes = resp.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&bytes).context("the server sent something that is not JSON")
}

fn problem_text(v: &Value) -> String {
    match (v["title"].as_str(), v["detail"].as_str()) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        _ => v.to_string(),
    }
}

fn read_payload(arg: Option<&str>) -> anyhow::Result<String> {
    let text = match arg {
        None => "{}".to_owned(),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the payload from standard input")?;
            s
        }
        Some(file) if file.starts_with('@') => std::fs::read_to_string(&file[1..])
            .with_context(|| format!("cannot read the payload file {}", &file[1..]))?,
        Some(json) => json.to_owned(),
    };
    serde_json::from_str::<Value>(&text).with_context(|| "the payload is not valid JSON; pass JSON text such as '{\"n\": 3}', @file.json, or - for standard input")?;
    Ok(text)
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<i32> {
    let payload = read_payload(args.payload.as_deref())?;
    let c = client();
    let server = &args.server.server;
    let mut req = request(
        Method::POST,
        &args.server,
        &format!("/events/{}", args.kind),
    )
    .header("content-type", "application/json");
    if let Some(key) = &args.key {
        req = req.header("idempotency-key", key);
    }
    let resp = send(&c, req.body(Full::new(Bytes::from(payload)))?, server).await?;
    let ok = resp.status().is_success();
    let body = body_json(resp).await?;
    if !ok {
        bail!("{}", problem_text(&body));
    }
    let id = body["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server's answer has no id: {body}"))?
        .to_owned();
    if !args.wait {
        println!("{id}");
        return Ok(0);
    }
    eprintln!("submitted {} as {id}", args.kind);
    let last = follow(&c, &args.server, &id).await?;
    finish(&c, &args.server, &id, &last).await
}

/// Follows the SSE stream until `end`, drawing progress on stderr.
async fn follow(c: &HttpClient, to: &ServerArg, id: &str) -> anyhow::Result<Value> {
    let server = &to.server;
    let mut last_id: Option<String> = None;
    let mut last_status = Value::Null;
    let mut failures = 0;
    let tty = std::io::stderr().is_terminal();
    loop {
        let mut req = request(Method::GET, to, &format!("/events/{id}/stream"))
            .header("accept", "text/event-stream");
        if let Some(l) = &last_id {
            req = req.header("last-event-id", l.as_str());
        }
        let resp = match c.request(req.body(Full::new(Bytes::new()))?).await {
            Ok(r) => r,
            Err(e) if failures < 30 => {
                failures += 1;
                tracing::debug!(error = %e, "stream connection failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => bail!("lost the connection to {server}: {e}"),
        };
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(last_status);
        }
        if !resp.status().is_success() {
            let body = body_json(resp).await?;
            bail!("{}", problem_text(&body));
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        let mut event = Event::default();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\r', '\n']);
                if !line.is_empty() {
                    event.field(line);
                    continue;
                }
                let done = std::mem::take(&mut event);
                if done.data.is_empty() {
                    continue;
                }
                if let Some(i) = &done.id {
                    last_id = Some(i.clone());
                }
                let status: Value = serde_json::from_str(&done.data).unwrap_or(Value::Null);
                if status["seq"] != last_status["seq"] {
                    draw(&status, tty);
                }
                last_status = status;
                if done.name.as_deref() == Some("end") {
                    if tty {
                        eprintln!();
                    }
                    return Ok(last_status);
                }
            }
        }
        failures += 1;
        if failures > 30 {
            bail!("the stream from {server} kept breaking off");
        }
    }
}

#[derive(Default)]
struct Event {
    name: Option<String>,
    id: Option<String>,
    data: String,
}

impl Event {
    fn field(&mut self, line: &str) {
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match key {
            "event" => self.name = Some(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
    }
}

fn draw(status: &Value, tty: bool) {
    let pct = status["progress"].as_f64().unwrap_or(0.0);
    let state = status["state"].as_str().unwrap_or("?");
    let msg = status["message"].as_str().unwrap_or("");
    let filled = (pct / 5.0).round() as usize;
    let bar = format!(
        "[{}{}] {pct:>3.0}% {state} {msg}",
        "#".repeat(filled),
        ".".repeat(20 - filled.min(20))
    );
    if tty {
        eprint!("\r\x1b[2K{bar}");
    } else {
        eprintln!("{bar}");
    }
    let _ = std::io::stderr().flush();
}

async fn finish(c: &HttpClient, to: &ServerArg, id: &str, last: &Value) -> anyhow::Result<i32> {
    if last["state"] != "succeeded" {
        eprintln!(
            "event {id} ended {}: {}",
            last["state"].as_str().unwrap_or("?"),
            last["error"].as_str().unwrap_or("no error recorded")
        );
        return Ok(1);
    }
    let resp = send(
        c,
        request(Method::GET, to, &format!("/events/{id}/result")).body(Full::new(Bytes::new()))?,
        &to.server,
    )
    .await?;
    let bytes = resp.into_body().collect().await?.to_bytes();
    std::io::stdout().write_all(&bytes)?;
    Ok(0)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let c = client();
    let server = &args.server.server;
    let req = request(Method::GET, &args.server, &format!("/events/{}", args.id))
        .header("accept", "application/json");
    let resp = send(&c, req.body(Full::new(Bytes::new()))?, server).await?;
    let ok = resp.status().is_success();
    let body = body_json(resp).await?;
    if !ok {
        bail!("{}", problem_text(&body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(0)
}
