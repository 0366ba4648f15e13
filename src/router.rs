//! Routing: a pure function from method and path to a [`Route`]. No I/O, no state.

use http::Method;

use crate::config::is_valid_function_name;

/// The path prefix of sync invocations.
pub const FUNCTION_PREFIX: &str = "/function/";
/// The path prefix of async invocations.
pub const ASYNC_FUNCTION_PREFIX: &str = "/async-function/";

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/function/{name}[/{rest}]`: sync invocation. `path` is `/{rest}` (at least `/`).
    Invoke {
        /// The function's name (valid syntax, maybe not configured).
        name: &'a str,
        /// The path the replica sees.
        path: &'a str,
    },
    /// `POST /async-function/{name}[/{rest}]`.
    InvokeAsync {
        /// The function's name.
        name: &'a str,
        /// The path the replica sees.
        path: &'a str,
    },
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Healthz,
    /// `GET /readyz`.
    Readyz,
    /// `GET /system/functions`.
    ListFunctions,
    /// `GET /system/function/{name}`.
    GetFunction(&'a str),
    /// `POST /system/scale-function/{name}`.
    ScaleFunction(&'a str),
    /// `POST /system/pause-function/{name}`.
    PauseFunction(&'a str),
    /// `POST /system/resume-function/{name}`.
    ResumeFunction(&'a str),
    /// `GET /system/function/{name}/tokens`.
    ListTokens(&'a str),
    /// `POST /system/function/{name}/tokens`.
    CreateToken(&'a str),
    /// `DELETE /system/function/{name}/tokens/{id}`.
    RevokeToken(&'a str, &'a str),
    /// `POST /system/reload`.
    Reload,
    /// `GET /system/async/{call_id}`: the call id as in the path (percent-encoded).
    AsyncRecord(&'a str),
    /// `GET /system/async-dead-letters`.
    DeadLetters,
    /// `POST /system/async-dead-letters/{function}/{id}/replay`.
    ReplayDeadLetter(&'a str, u64),
    /// `DELETE /system/async-dead-letters/{function}/{id}`.
    DiscardDeadLetter(&'a str, u64),
    /// A function route whose name is not a valid function name.
    MalformedName,
    /// A known path with the wrong method; the value lists the allowed ones.
    MethodNotAllowed(&'static str),
    /// Nothing matches.
    NotFound,
}

/// Splits `/{name}[/{rest}]` into the name and `/{rest}` (or `/`).
fn name_and_rest(tail: &str) -> (&str, &str) {
    match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, "/"),
    }
}

/// Routes a request by method and path (the path without the query string).
pub fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    if let Some(tail) = path.strip_prefix(FUNCTION_PREFIX) {
        let (name, rest) = name_and_rest(tail);
        if !is_valid_function_name(name) {
            return Route::MalformedName;
        }
        return Route::Invoke { name, path: rest };
    }
    if let Some(tail) = path.strip_prefix(ASYNC_FUNCTION_PREFIX) {
        let (name, rest) = name_and_rest(tail);
        if !is_valid_function_name(name) {
            return Route::MalformedName;
        }
        if method != Method::POST {
            return Route::MethodNotAllowed("POST");
        }
        return Route::InvokeAsync { name, path: rest };
    }
    if path == "/function" || path == "/async-function" {
        return Route::MalformedName;
    }
    let get_only = |route: Route<'a>| {
        if method == Method::GET || method == Method::HEAD {
            route
        } else {
            Route::MethodNotAllowed("GET")
        }
    };
    match path {
        "/metrics" => return get_only(Route::Metrics),
        "/healthz" => return get_only(Route::Healthz),
        "/readyz" => return get_only(Route::Readyz),
        "/system/functions" => return get_only(Route::ListFunctions),
        "/system/async-dead-letters" => return get_only(Route::DeadLetters),
        "/system/reload" if method == Method::POST => return Route::Reload,
        "/system/reload" => return Route::MethodNotAllowed("POST"),
        _ => {}
    }
    if let Some(call_id) = path.strip_prefix("/system/async/") {
        if call_id.is_empty() {
            return Route::NotFound;
        }
        return get_only(Route::AsyncRecord(call_id));
    }
    if let Some(tail) = path.strip_prefix("/system/async-dead-letters/") {
        return dead_letter(method, tail);
    }
    if let Some(tail) = path.strip_prefix("/system/function/") {
        let (name, rest) = name_and_rest(tail);
        if !is_valid_function_name(name) {
            return Route::MalformedName;
        }
        return match rest {
            "/" if tail.len() == name.len() => get_only(Route::GetFunction(name)),
            "/tokens" if method == Method::POST => Route::CreateToken(name),
            "/tokens" if method == Method::GET || method == Method::HEAD => Route::ListTokens(name),
            "/tokens" => Route::MethodNotAllowed("GET, POST"),
            _ => match rest.strip_prefix("/tokens/") {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    if method == Method::DELETE {
                        Route::RevokeToken(name, id)
                    } else {
                        Route::MethodNotAllowed("DELETE")
                    }
                }
                _ => Route::NotFound,
            },
        };
    }
    for (prefix, control) in [
        (
            "/system/scale-function/",
            Route::ScaleFunction as fn(&'a str) -> Route<'a>,
        ),
        ("/system/pause-function/", Route::PauseFunction),
        ("/system/resume-function/", Route::ResumeFunction),
    ] {
        if let Some(name) = path.strip_prefix(prefix) {
            if !is_valid_function_name(name) {
                return Route::MalformedName;
            }
            if method != Method::POST {
                return Route::MethodNotAllowed("POST");
            }
            return control(name);
        }
    }
    Route::NotFound
}

/// `{function}/{id}` (`DELETE`) or `{function}/{id}/replay` (`POST`) under
/// `/system/async-dead-letters/`.
fn dead_letter<'a>(method: &Method, tail: &'a str) -> Route<'a> {
    let mut parts = tail.split('/');
    let (Some(name), Some(id)) = (parts.next(), parts.next()) else {
        return Route::NotFound;
    };
    if !is_valid_function_name(name) {
        return Route::MalformedName;
    }
    let Some(id) = id
        .parse::<u64>()
        .ok()
        .filter(|_| id.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Route::NotFound;
    };
    match (parts.next(), parts.next()) {
        (None, None) if method == Method::DELETE => Route::DiscardDeadLetter(name, id),
        (None, None) => Route::MethodNotAllowed("DELETE"),
        (Some("replay"), None) if method == Method::POST => Route::ReplayDeadLetter(name, id),
        (Some("replay"), None) => Route::MethodNotAllowed("POST"),
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_routes_keep_the_rest_of_the_path() {
        assert_eq!(
            route(&Method::GET, "/function/echo"),
            Route::Invoke {
                name: "echo",
                path: "/"
            }
        );
        assert_eq!(
            route(&Method::DELETE, "/function/echo/"),
            Route::Invoke {
                name: "echo",
                path: "/"
            }
        );
        assert_eq!(
            route(&Method::PUT, "/function/echo/a/b"),
            Route::Invoke {
                name: "echo",
                path: "/a/b"
            }
        );
        assert_eq!(
            route(&Method::POST, "/async-function/echo/x"),
            Route::InvokeAsync {
                name: "echo",
                path: "/x"
            }
        );
    }

    #[test]
    fn async_record_and_dead_letter_routes() {
        assert_eq!(
            route(&Method::GET, "/system/async/abc-1"),
            Route::AsyncRecord("abc-1")
        );
        assert_eq!(route(&Method::GET, "/system/async/"), Route::NotFound);
        assert_eq!(
            route(&Method::POST, "/system/async/x"),
            Route::MethodNotAllowed("GET")
        );
        assert_eq!(
            route(&Method::GET, "/system/async-dead-letters"),
            Route::DeadLetters
        );
        assert_eq!(
            route(&Method::POST, "/system/async-dead-letters/job/7/replay"),
            Route::ReplayDeadLetter("job", 7)
        );
        assert_eq!(
            route(&Method::DELETE, "/system/async-dead-letters/job/7"),
            Route::DiscardDeadLetter("job", 7)
        );
        assert_eq!(
            route(&Method::GET, "/system/async-dead-letters/job/7"),
            Route::MethodNotAllowed("DELETE")
        );
        assert_eq!(
            route(&Method::GET, "/system/async-dead-letters/job/7/replay"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(
            route(&Method::DELETE, "/system/async-dead-letters/job/+7"),
            Route::NotFound
        );
        assert_eq!(
            route(&Method::DELETE, "/system/async-dead-letters/Job/7"),
            Route::MalformedName
        );
    }

    #[test]
    fn pause_and_token_routes() {
        assert_eq!(
            route(&Method::POST, "/system/pause-function/job"),
            Route::PauseFunction("job")
        );
        assert_eq!(
            route(&Method::POST, "/system/resume-function/job"),
            Route::ResumeFunction("job")
        );
        assert_eq!(
            route(&Method::GET, "/system/pause-function/job"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(
            route(&Method::POST, "/system/pause-function/Job"),
            Route::MalformedName
        );
        assert_eq!(
            route(&Method::GET, "/system/function/job"),
            Route::GetFunction("job")
        );
        assert_eq!(
            route(&Method::POST, "/system/function/job/tokens"),
            Route::CreateToken("job")
        );
        assert_eq!(
            route(&Method::GET, "/system/function/job/tokens"),
            Route::ListTokens("job")
        );
        assert_eq!(
            route(&Method::PUT, "/system/function/job/tokens"),
            Route::MethodNotAllowed("GET, POST")
        );
        assert_eq!(
            route(&Method::DELETE, "/system/function/job/tokens/ab12"),
            Route::RevokeToken("job", "ab12")
        );
        assert_eq!(
            route(&Method::GET, "/system/function/job/tokens/ab12"),
            Route::MethodNotAllowed("DELETE")
        );
        assert_eq!(
            route(&Method::DELETE, "/system/function/job/tokens/"),
            Route::NotFound
        );
        assert_eq!(
            route(&Method::GET, "/system/function/job/other"),
            Route::NotFound
        );
    }

    #[test]
    fn malformed_names_and_methods() {
        assert_eq!(route(&Method::GET, "/function/Echo"), Route::MalformedName);
        assert_eq!(route(&Method::GET, "/function/"), Route::MalformedName);
        assert_eq!(route(&Method::GET, "/function/a%2Fb"), Route::MalformedName);
        assert_eq!(route(&Method::GET, "/function"), Route::MalformedName);
        assert_eq!(
            route(&Method::GET, "/async-function/echo"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(
            route(&Method::POST, "/metrics"),
            Route::MethodNotAllowed("GET")
        );
        assert_eq!(route(&Method::GET, "/nope"), Route::NotFound);
        assert_eq!(
            route(&Method::GET, "/system/scale-function/x"),
            Route::MethodNotAllowed("POST")
        );
    }
}
