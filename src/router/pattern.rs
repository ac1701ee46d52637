//! Parsing and matching of APISIX `uri` patterns.
//!
//! A pattern is split into its *literal prefix* (everything before the first
//! `:param` or `*`) and a [`Tail`] describing what must follow the prefix.
//! The prefix is what the radix tree indexes; the tail is checked byte-wise
//! against the rest of the request path, without regexes or allocation.

/// One element of a pattern tail, in order.
#[derive(Debug)]
pub(crate) enum Token {
    /// Bytes that must appear verbatim.
    Literal(Box<str>),
    /// `:name`: one non-empty path segment (no `/`).
    Param(Box<str>),
}

/// The optional trailing wildcard of a pattern.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wildcard {
    /// The pattern has no trailing `*`; the tail must consume the whole path.
    None,
    /// A bare `*`: whatever remains is reported as `ext` (APISIX's `:ext`).
    Anonymous,
    /// `*name`: whatever remains is reported as the parameter `name`.
    Named(Box<str>),
}

/// What must follow the literal prefix of a pattern route.
#[derive(Debug)]
pub(crate) struct Tail {
    pub(crate) tokens: Box<[Token]>,
    pub(crate) wildcard: Wildcard,
    /// Number of entries `captures` pushes into `params`.
    pub(crate) n_params: usize,
}

/// `(params, ext)` as reported in a `RouteMatch`.
pub(crate) type Captures = (Vec<(String, String)>, Option<String>);

/// The result of parsing one uri.
#[derive(Debug)]
pub(crate) enum Parsed<'a> {
    /// No parameters or wildcards: the uri must equal the path.
    Exact,
    /// A prefix route: `prefix` is the literal text before the first
    /// parameter or wildcard.
    Pattern { prefix: &'a str, tail: Tail },
}

/// Parses an APISIX uri pattern.
///
/// Rules:
/// * the uri is non-empty and starts with `/`;
/// * a `:` at the start of a path segment begins a parameter whose name runs
///   to the next `/` (or the end); the name must be non-empty and may not
///   contain `:` or `*`. A `:` elsewhere is an ordinary character;
/// * a `*` may only appear once, at the very end of the uri (`/a/*`, `/a*`),
///   or at the start of the last segment followed by a name (`/a/*path`).
pub(crate) fn parse(uri: &str) -> Result<Parsed<'_>, &'static str> {
    let b = uri.as_bytes();
    if b.is_empty() {
        return Err("uri is empty");
    }
    if b[0] != b'/' {
        return Err("uri must start with '/'");
    }

    let mut prefix_end: Option<usize> = None;
    let mut tokens: Vec<Token> = Vec::new();
    let mut wildcard = Wildcard::None;
    let mut lit_start = 0usize;
    let mut i = 0usize;

    // Ends the literal run `lit_start..at`: the first one is the prefix, the
    // later ones become literal tokens.
    fn flush(
        uri: &str,
        prefix_end: &mut Option<usize>,
        tokens: &mut Vec<Token>,
        lit_start: usize,
        at: usize,
    ) {
        if prefix_end.is_none() {
            *prefix_end = Some(at);
        } else if lit_start < at {
            tokens.push(Token::Literal(uri[lit_start..at].into()));
        }
    }

    while i < b.len() {
        match b[i] {
            // `i >= 1` here because `b[0] == b'/'`.
            b':' if b[i - 1] == b'/' => {
                flush(uri, &mut prefix_end, &mut tokens, lit_start, i);
                let end = memchr_slash(&b[i + 1..]).map_or(b.len(), |p| i + 1 + p);
                let name = &uri[i + 1..end];
                if name.is_empty() {
                    return Err("parameter ':' has an empty name");
                }
                if name.contains([':', '*']) {
                    return Err("parameter name may not contain ':' or '*'");
                }
                tokens.push(Token::Param(name.into()));
                i = end;
                lit_start = end;
            }
            b'*' => {
                flush(uri, &mut prefix_end, &mut tokens, lit_start, i);
                let name = &uri[i + 1..];
                if name.contains(['/', '*']) {
                    return Err("'*' is only allowed at the end of the uri");
                }
                if name.contains(':') {
                    return Err("wildcard name may not contain ':'");
                }
                wildcard = if name.is_empty() {
                    Wildcard::Anonymous
                } else if b[i - 1] == b'/' {
                    Wildcard::Named(name.into())
                } else {
                    return Err("a named wildcard '*name' must start a path segment");
                };
                i = b.len();
                lit_start = b.len();
            }
            _ => i += 1,
        }
    }

    let Some(prefix_end) = prefix_end else {
        return Ok(Parsed::Exact);
    };
    if lit_start < b.len() {
        tokens.push(Token::Literal(uri[lit_start..].into()));
    }
    let n_params = tokens
        .iter()
        .filter(|t| matches!(t, Token::Param(_)))
        .count()
        + usize::from(matches!(wildcard, Wildcard::Named(_)));
    Ok(Parsed::Pattern {
        prefix: &uri[..prefix_end],
        tail: Tail {
            tokens: tokens.into_boxed_slice(),
            wildcard,
            n_params,
        },
    })
}

#[inline]
fn memchr_slash(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'/')
}

impl Tail {
    /// Whether `rest` (the request path after the literal prefix) matches.
    #[inline]
    pub(crate) fn matches(&self, rest: &str) -> bool {
        self.walk(rest, |_, _| {}).is_some()
    }

    /// Walks `rest`, calling `on_param(token_index, value)` for each `:param`;
    /// returns the offset where the trailing wildcard starts (or `rest.len()`
    /// when there is none), or `None` if `rest` does not match.
    #[inline]
    fn walk<'p>(&self, rest: &'p str, mut on_param: impl FnMut(usize, &'p str)) -> Option<usize> {
        let b = rest.as_bytes();
        let mut pos = 0usize;
        for (ti, tok) in self.tokens.iter().enumerate() {
            match tok {
                Token::Literal(lit) => {
                    if !b[pos..].starts_with(lit.as_bytes()) {
                        return None;
                    }
                    pos += lit.len();
                }
                Token::Param(_) => {
                    let len = memchr_slash(&b[pos..]).unwrap_or(b.len() - pos);
                    if len == 0 {
                        return None;
                    }
                    // `pos` and `pos + len` sit on char boundaries: they are
                    // the start/end of the path, or next to an ASCII byte
                    // ('/', or the edge of a literal that is itself a str).
                    on_param(ti, &rest[pos..pos + len]);
                    pos += len;
                }
            }
        }
        match self.wildcard {
            Wildcard::None => (pos == b.len()).then_some(pos),
            _ => Some(pos),
        }
    }

    /// Captures of a matching `rest`: the `:param` and `*name` values in
    /// pattern order, and the anonymous wildcard's tail.
    pub(crate) fn captures(&self, rest: &str) -> Option<Captures> {
        let mut params = Vec::with_capacity(self.n_params);
        let wild_at = self.walk(rest, |ti, v| {
            if let Token::Param(name) = &self.tokens[ti] {
                params.push((name.to_string(), v.to_string()));
            }
        })?;
        let tail = &rest[wild_at..];
        let ext = match &self.wildcard {
            Wildcard::None => None,
            Wildcard::Anonymous => Some(tail.to_string()),
            Wildcard::Named(name) => {
                params.push((name.to_string(), tail.to_string()));
                None
            }
        };
        Some((params, ext))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(uri: &str) -> (&str, Tail) {
        match parse(uri).unwrap() {
            Parsed::Pattern { prefix, tail } => (prefix, tail),
            Parsed::Exact => panic!("{uri} parsed as exact"),
        }
    }

    #[test]
    fn exact_uris() {
        for u in ["/", "/hello", "/a/b/c/", "/v1/things:batchGet", "/a/b:c/d"] {
            assert!(matches!(parse(u), Ok(Parsed::Exact)), "{u}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(pat("/hello/*").0, "/hello/");
        assert_eq!(pat("/hello*").0, "/hello");
        assert_eq!(pat("/*").0, "/");
        assert_eq!(pat("/user/:id/profile").0, "/user/");
        assert_eq!(pat("/:id").0, "/");
        assert_eq!(pat("/files/*path").0, "/files/");
        assert_eq!(pat("/v1/a:b/:id").0, "/v1/a:b/");
        let (_, t) = pat("/user/:id/profile");
        assert_eq!(t.n_params, 1);
        assert_eq!(t.wildcard, Wildcard::None);
        let (_, t) = pat("/files/*path");
        assert_eq!(t.n_params, 1);
        assert_eq!(t.wildcard, Wildcard::Named("path".into()));
        let (_, t) = pat("/a/:x/:y/*");
        assert_eq!(t.n_params, 2);
        assert_eq!(t.wildcard, Wildcard::Anonymous);
    }

    #[test]
    fn bad_patterns() {
        for u in [
            "",
            "hello",
            "*",
            ":id",
            "/user/:",
            "/user/:/x",
            "/a/*/b",
            "/a/*b/c",
            "/a/*/",
            "/a**",
            "/a/:id*",
            "/a/:x:y",
            "/a/*x:y",
            "/a*name",
        ] {
            assert!(parse(u).is_err(), "{u:?} should be rejected");
        }
    }

    #[test]
    fn tail_matching() {
        let (_, t) = pat("/user/:id/profile");
        assert!(t.matches("42/profile"));
        assert!(!t.matches("42/profile/"));
        assert!(!t.matches("/profile"));
        assert!(!t.matches("42/x/profile"));
        assert!(!t.matches("42"));
        assert_eq!(
            t.captures("42/profile").unwrap(),
            (vec![("id".into(), "42".into())], None)
        );

        let (_, t) = pat("/a/:x/:y/*");
        assert_eq!(
            t.captures("1/2/").unwrap(),
            (
                vec![("x".into(), "1".into()), ("y".into(), "2".into())],
                Some(String::new())
            )
        );
        assert!(!t.matches("1/2"));

        let (_, t) = pat("/a/:name.json");
        // APISIX semantics: the parameter is the whole segment.
        assert_eq!(
            t.captures("x.yaml").unwrap().0,
            vec![("name.json".into(), "x.yaml".into())]
        );

        let (_, t) = pat("/u/:id");
        assert_eq!(t.captures("é").unwrap().0, vec![("id".into(), "é".into())]);
    }
}
