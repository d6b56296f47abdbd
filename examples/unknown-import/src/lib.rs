//! `unknown-import`: a test fixture whose component imports `perch:fixture/teleport`, an
//! interface the agent never provides, so tests can check it is refused with a clear error.

wit_bindgen::generate!({
    // Perch's package first, so the fixture's world can refer to `perch:device/timer`.
    path: ["../../wit", "wit"],
    world: "perch:fixture/unknown-import",
});

use exports::perch::device::timer;
use perch::fixture::teleport;

struct UnknownImport;

impl timer::Guest for UnknownImport {
    fn on_tick() -> Result<(), String> {
        // Calling the import keeps it in the component (unused imports are dropped).
        if teleport::beam("mars") {
            Ok(())
        } else {
            Err("teleport failed".to_owned())
        }
    }
}

export!(UnknownImport);
