//! Bearer tokens with scopes: who may submit, read, cancel, or do anything.
//!
//! Tokens come from a file (`tokens_file`, `--tokens`) and from the
//! environment (`SPOOLD_TOKENS`), one per line:
//!
//! ```text
//! # name     scopes          token
//! webapp     submit,read     Zq3v0c6h3b5JcF1x8o2sWw
//! browser    read            1n5tq0TgqK4wJX2s7yQ9aA
//! ops        admin           9mWm3kX0gq6V1t4uZp8rLs
//! ```
//!
//! With no token configured, nothing is checked (spoold then only listens on
//! loopback, unless `--insecure`). With tokens, every request but `GET /`,
//! `GET /healthz` and CORS preflights must carry one: `Authorization: Bearer
//! TOKEN`, or `?access_token=TOKEN` on a GET, because a browser cannot add a
//! header to an `EventSource` or to a page it reloads (RFC 6750 §2.3).
//!
//! Only SHA-256 digests of the tokens are kept, and a presented token is
//! compared with every one of them without an early exit, so neither the
//! time an answer takes nor a memory dump gives a token away.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// What a token may do. `Admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /events/...`
    Submit,
    /// `GET` of events, results, streams, pages and `/handlers`.
    Read,
    /// `DELETE /events/{id}`
    Cancel,
    /// `/metrics`, and everything the other scopes allow.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Submit, Scope::Read, Scope::Cancel, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|sc| sc.as_str() == s)
    }
}

/// One configured token: its name (for logs and error messages), its scopes,
/// and the digest of its secret.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    pub scopes: Vec<Scope>,
    digest: [u8; 32],
}

impl Token {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Every configured token. Empty: authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Token>);

/// Tokens shorter than this are refused: a guessable token is no lock.
pub const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds the tokens in `text` (the format above); `source` names it in errors.
    pub fn add_lines(&mut self, text: &str, source: &str) -> anyhow::Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let token = parse_line(line).with_context(|| format!("{source}, line {}", n + 1))?;
            if self.0.iter().any(|t| t.name == token.name) {
                bail!(
                    "{source}, line {}: a token named {:?} is already defined; names must be unique",
                    n + 1,
                    token.name
                );
            }
            if self.0.iter().any(|t| t.digest == token.digest) {
                bail!(
                    "{source}, line {}: token {:?} repeats the secret of another token; give every client its own",
                    n + 1,
                    token.name
                );
            }
            self.0.push(token);
        }
        Ok(())
    }

    /// Reads a tokens file, refusing one that others may write and warning
    /// about one that others may read.
    pub fn add_file(&mut self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
        if meta.mode() & 0o002 != 0 {
            bail!(
                "the tokens file {} is writable by everyone; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        if meta.mode() & 0o004 != 0 {
            tracing::warn!(file = %path.display(), "the tokens file is readable by everyone; chmod 600 it");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
        self.add_lines(&text, &path.display().to_string())
    }

    /// The token whose secret is `presented`, compared in constant time.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for t in &self.0 {
            // No early exit: every token is compared, every byte of each.
            if constant_time_eq(&t.digest, &digest) {
                found = Some(t);
            }
        }
        found
    }
}

fn parse_line(line: &str) -> anyhow::Result<Token> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, scopes, secret] = fields[..] else {
        bail!(
            "write `NAME SCOPES TOKEN`, e.g. `webapp submit,read <token>`; this line has {} fields",
            fields.len()
        );
    };
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        bail!("token name {name:?} must be 1 to 64 letters, digits, '-' or '_'");
    }
    let scopes = scopes
        .split(',')
        .map(|s| {
            Scope::parse(s).with_context(|| {
                format!("{s:?} is not a scope; the scopes are submit, read, cancel and admin")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if secret.len() < MIN_TOKEN_LEN {
        bail!(
            "token {name:?} is {} characters; use at least {MIN_TOKEN_LEN}, e.g. from `openssl rand -base64 24`",
            secret.len()
        );
    }
    // RFC 6750's b64token characters: safe in a header and in a query string.
    if !secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        bail!("token {name:?} may only contain letters, digits and - . _ ~ + / =");
    }
    Ok(Token {
        name: name.to_owned(),
        scopes,
        digest: Sha256::digest(secret.as_bytes()).into(),
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbb+/=~";

    fn tokens(text: &str) -> anyhow::Result<Tokens> {
        let mut t = Tokens::default();
        t.add_lines(text, "test")?;
        Ok(t)
    }

    #[test]
    fn lines_give_named_scoped_tokens() {
        let t = tokens(&format!(
            "# comment\n\nweb submit,read {A}  # trailing comment\nops admin {B}\n"
        ))
        .unwrap();
        assert_eq!(t.len(), 2);
        let web = t.find(A).unwrap();
        assert_eq!(web.name, "web");
        assert!(web.allows(Scope::Submit) && web.allows(Scope::Read));
        assert!(!web.allows(Scope::Cancel) && !web.allows(Scope::Admin));
        let ops = t.find(B).unwrap();
        assert!(Scope::ALL.iter().all(|&s| ops.allows(s)));
        assert!(t.find("aaaaaaaaaaaaaaaaaaa").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn bad_lines_say_what_to_fix() {
        for (text, says) in [
            ("web read", "NAME SCOPES TOKEN"),
            (&format!("web write {A}"), "not a scope"),
            ("web read short", "at least 16"),
            (&format!("w/eb read {A}"), "token name"),
            ("web read aaaaaaaaaaaaaaaa;rm", "may only contain"),
            (&format!("a read {A}\na admin {B}"), "already defined"),
            (&format!("a read {A}\nb admin {A}"), "repeats the secret"),
        ] {
            let e = format!("{:#}", tokens(text).unwrap_err());
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let t = tokens(&format!("web read {A}")).unwrap();
        assert!(!format!("{t:?}").contains(A));
    }
}
