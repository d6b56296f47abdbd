//! `http-hello`: answers every request under its route with `200 hello from perch\n`
//! (`text/plain`), whatever the method, path or body.

use perch_sdk::{App, Request, Response};

struct Hello;

impl App for Hello {
    fn on_http(_request: Request) -> Response {
        Response::text(200, "hello from perch\n")
    }
}

perch_sdk::export!(Hello);
