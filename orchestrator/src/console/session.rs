//! Who is using the console, and that each action is really theirs.
//!
//! With authentication on, the login page takes a bearer token (the same
//! tokens as the API, checked against the access file in force) and opens
//! a session: a random id in a cookie that scripts cannot read (HttpOnly),
//! that no other site's page sends (SameSite=Strict), over TLS only
//! (Secure) when the listener speaks TLS. With authentication off every
//! visitor gets an `anonymous` session at once, so that the CSRF check
//! below still applies: a page elsewhere must not be able to cancel a
//! saga through a browser on the operator's machine.
//!
//! Every POST must carry the session's CSRF token (a form field `csrf`,
//! or the `x-csrf-token` header); [`require`] checks it before any
//! handler runs, so no action can forget to.

use axum::{
    Form,
    body::{Body, to_bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use chrono::{Duration as Age, Utc};
use maud::html;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Console, ConsoleError, layout};
use crate::{security::Principal, store::console as rows};

/// The cookie's name.
pub const COOKIE: &str = "saga_session";
/// How long a session lasts.
const LIFETIME: Age = Age::hours(12);
/// Largest form the console accepts.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The signed-in operator, as handlers receive it (a request extension
/// set by [`require`]).
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it is, with the roles the access file gives them now.
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn hash(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn cookie(console: &Console, id: &str, max_age: i64) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if console.inner.secure { "; Secure" } else { "" }
    )
}

/// Opens a session for `principal`; returns the cookie to set.
async fn open(console: &Console, principal: &Principal) -> Result<(Session, String), ConsoleError> {
    let id = random_hex();
    let row = rows::SessionRow {
        principal: principal.name().to_owned(),
        csrf: random_hex(),
    };
    let now = Utc::now();
    let store = console.store();
    store
        .within(rows::create_session(
            store.pool(),
            &hash(&id),
            &row,
            now,
            now + LIFETIME,
        ))
        .await
        .map_err(unavailable)?;
    Ok((
        Session {
            principal: principal.clone(),
            csrf: row.csrf,
        },
        cookie(console, &id, LIFETIME.num_seconds()),
    ))
}

fn unavailable(error: crate::store::StoreError) -> ConsoleError {
    ConsoleError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the database is unavailable: {}",
            sagas::errors::Chain(&error)
        ),
    )
}

/// The session of this request, if it has a live one whose principal is
/// still in the access file.
async fn find(console: &Console, headers: &HeaderMap) -> Result<Option<Session>, ConsoleError> {
    let Some(id) = session_id(headers) else {
        return Ok(None);
    };
    let store = console.store();
    let row = store
        .within(rows::session(store.pool(), &hash(&id), Utc::now()))
        .await
        .map_err(unavailable)?;
    Ok(row.and_then(|row| {
        let principal = console.inner.access.principal_named(&row.principal)?;
        Some(Session {
            principal,
            csrf: row.csrf,
        })
    }))
}

/// In front of every page and action: finds the session (or, with
/// authentication off, opens an anonymous one; with it on, sends the
/// visitor to the login page) and checks the CSRF token of every POST.
pub async fn require(
    State(console): State<Console>,
    request: Request,
    next: Next,
) -> Result<Response, ConsoleError> {
    let mut set_cookie = None;
    let session = match find(&console, request.headers()).await? {
        Some(session) => session,
        None if !console.inner.access.is_on() => {
            let (session, cookie) = open(&console, &Principal::open()).await?;
            set_cookie = Some(cookie);
            session
        }
        None => return Ok(to_login(&request)),
    };
    let request = if request.method() == Method::POST {
        check_csrf(request, &session.csrf).await?
    } else {
        request
    };
    let mut request = request;
    request.extensions_mut().insert(session);
    let mut response = next.run(request).await;
    if let Some(cookie) = set_cookie
        && let Ok(value) = cookie.parse()
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// To the login page, coming back here afterwards; an htmx request (a
/// part refreshing itself) is told to send the whole page there.
fn to_login(request: &Request) -> Response {
    let next = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let target = format!("/login?next={}", urlencode(&next));
    if request.headers().contains_key("hx-request") {
        return (StatusCode::UNAUTHORIZED, [("hx-redirect", target)]).into_response();
    }
    if request.method() == Method::GET {
        Redirect::to(&target).into_response()
    } else {
        (StatusCode::UNAUTHORIZED, "sign in first").into_response()
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Reads the form (or the header) and compares its `csrf` with the
/// session's in constant time; gives the request back with its body.
async fn check_csrf(request: Request, expected: &str) -> Result<Request, ConsoleError> {
    let forbidden = || {
        ConsoleError::new(
            StatusCode::FORBIDDEN,
            "this action did not come from a console page of your session (missing or wrong CSRF token); reload the page and try again",
        )
    };
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| ConsoleError::new(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    let given = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            form_urlencoded::parse(&bytes)
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.into_owned())
        })
        .ok_or_else(forbidden)?;
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(forbidden());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// `?next=` of the login page: only a path of this console (never
/// another site).
#[derive(Debug, serde::Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: String,
}

fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

/// The login page.
pub async fn login_page(
    State(console): State<Console>,
    axum::extract::Query(query): axum::extract::Query<LoginQuery>,
) -> Response {
    if !console.inner.access.is_on() {
        return Redirect::to(safe_next(&query.next)).into_response();
    }
    login_form(safe_next(&query.next), None, StatusCode::OK)
}

fn login_form(next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let page = layout::bare(
        "Sign in",
        html! {
            main.login {
                h1 { "saga-orchestrator" }
                @if let Some(error) = error { p.error #login-error { (error) } }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Access token" }
                    input #token type="password" name="token" autocomplete="off" required autofocus;
                    button type="submit" { "Sign in" }
                }
                p.hint { "A token from the access file (" code { "sagactl token" } " makes one)." }
            }
        },
    );
    (status, page).into_response()
}

/// The login form's fields.
#[derive(Debug, serde::Deserialize)]
pub struct Login {
    token: String,
    #[serde(default)]
    next: String,
}

/// Checks the token and opens a session.
pub async fn login(
    State(console): State<Console>,
    Form(form): Form<Login>,
) -> Result<Response, ConsoleError> {
    let next = safe_next(&form.next).to_owned();
    let token = form.token.trim();
    let Some(principal) = (!token.is_empty())
        .then(|| console.inner.access.principal_by_token(token))
        .flatten()
    else {
        tracing::info!("console sign-in refused: unknown token");
        return Ok(login_form(
            &next,
            Some("That token is not in the access file."),
            StatusCode::UNAUTHORIZED,
        ));
    };
    let (_, cookie) = open(&console, &principal).await?;
    tracing::info!(principal = principal.name(), "console sign-in");
    let mut response = Redirect::to(&next).into_response();
    if let Ok(value) = cookie.parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// Ends the session.
pub async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
) -> Result<Response, ConsoleError> {
    if let Some(id) = session_id(&headers) {
        let store = console.store();
        store
            .within(rows::delete_session(store.pool(), &hash(&id)))
            .await
            .map_err(unavailable)?;
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = cookie(&console, "", 0).parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_this_console_are_followed_after_login() {
        assert_eq!(safe_next("/sagas?state=failed"), "/sagas?state=failed");
        for bad in ["https://evil.example/", "//evil.example", "/\\evil", ""] {
            assert_eq!(safe_next(bad), "/", "{bad}");
        }
    }

    #[test]
    fn the_session_cookie_is_read_only_when_well_formed() {
        let id = "a".repeat(64);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(session_id(&headers), Some(id));
        headers.insert(header::COOKIE, format!("{COOKIE}=short").parse().unwrap());
        assert_eq!(session_id(&headers), None);
    }
}
