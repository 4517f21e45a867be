//! Bearer-token authentication (`--auth-token-file`).
//!
//! The file holds one token per line (blank lines and lines starting with
//! `#` are skipped); SIGHUP reloads it. Every `embedder.v1.Embedder` call
//! must carry `authorization: Bearer <token>` metadata with one of them;
//! an interceptor checks it before the call reaches the service, so a
//! missing or wrong token gets UNAUTHENTICATED and never costs engine work.
//! Health and reflection stay open (probes and `grpcurl list` need them).
//! Tokens are compared in constant time (`subtle`) and never logged. The
//! token a call came with is its [`Principal`]: a resumable session is bound
//! to the principal that created it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use super::error::ServiceError;

/// The token a call authenticated with (kept only to compare, never shown).
#[derive(Clone)]
pub struct Principal(Arc<[u8]>);

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Principal(<redacted>)")
    }
}

impl Principal {
    /// The hex SHA-256 of the token: what a stored session keeps of its
    /// creator (never the token).
    pub fn fingerprint(&self) -> String {
        super::store::owner_hash(&self.0)
    }
}

impl PartialEq for Principal {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Principal {}

/// The accepted tokens, reloadable.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    tokens: RwLock<Vec<Principal>>,
}

impl Tokens {
    /// Reads the token file.
    ///
    /// # Errors
    /// When the file cannot be read or holds no token.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Tokens>> {
        let tokens = read(path)?;
        Ok(Arc::new(Tokens {
            path: path.to_path_buf(),
            tokens: RwLock::new(tokens),
        }))
    }

    /// Reads the file again; on error the tokens in force stay. Returns how
    /// many tokens are now accepted.
    ///
    /// # Errors
    /// As [`Tokens::load`].
    pub fn reload(&self) -> anyhow::Result<usize> {
        let tokens = read(&self.path)?;
        let n = tokens.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
        Ok(n)
    }

    /// The principal of an `authorization` header value, if it is
    /// `Bearer <token>` with an accepted token. Every accepted token is
    /// compared, in constant time each.
    pub fn check(&self, authorization: Option<&[u8]>) -> Option<Principal> {
        let value = authorization?;
        let presented = strip_bearer(value)?;
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for t in tokens.iter() {
            if bool::from(t.0.as_ref().ct_eq(presented)) {
                found = Some(t.clone());
            }
        }
        found
    }
}

/// The Embedder service's interceptor: without tokens every call passes;
/// with them, the call's principal goes into its extensions, or the call
/// ends with UNAUTHENTICATED.
pub fn interceptor(tokens: Option<Arc<Tokens>>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let Some(tokens) = &tokens else {
            return Ok(request);
        };
        let header = request.metadata().get("authorization").map(|v| v.as_bytes());
        match tokens.check(header) {
            Some(principal) => {
                request.extensions_mut().insert(principal);
                Ok(request)
            }
            None => Err(ServiceError::Unauthenticated.to_status()),
        }
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

fn read(path: &Path) -> anyhow::Result<Vec<Principal>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let tokens: Vec<Principal> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Principal(Arc::from(l.as_bytes())))
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "the token file {} holds no token", path.display());
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(lines: &str) -> Arc<Tokens> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), lines).unwrap();
        Tokens::load(file.path()).unwrap()
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let t = tokens("# ops\nalpha-123\n\n  beta-456  \n");
        assert!(t.check(Some(b"Bearer alpha-123")).is_some());
        assert!(t.check(Some(b"bearer beta-456")).is_some());
        assert!(t.check(Some(b"Bearer alpha-12")).is_none());
        assert!(t.check(Some(b"Bearer alpha-1234")).is_none());
        assert!(t.check(Some(b"Basic alpha-123")).is_none());
        assert!(t.check(Some(b"alpha-123")).is_none());
        assert!(t.check(Some(b"Bearer # ops")).is_none(), "comments are not tokens");
        assert!(t.check(None).is_none());
        assert_ne!(t.check(Some(b"Bearer alpha-123")), t.check(Some(b"Bearer beta-456")));
        assert_eq!(
            format!("{:?}", t.check(Some(b"Bearer alpha-123")).unwrap()),
            "Principal(<redacted>)"
        );
    }

    #[test]
    fn an_empty_token_file_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "# nothing\n\n").unwrap();
        let err = Tokens::load(file.path()).unwrap_err().to_string();
        assert!(err.contains("holds no token"), "{err}");
    }
}
