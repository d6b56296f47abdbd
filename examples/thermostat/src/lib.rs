//! `thermostat`: keeps a room below a threshold with a fan.
//!
//! Every second it reads the `room-temp` sensor, switches the `fan` line on above
//! `threshold-c` and off again below `threshold-c - hysteresis-c` (so the fan does not
//! chatter around the threshold), publishes `{"t":..,"fan":..}` to the `climate` telemetry
//! stream, and remembers the fan state in kv. `GET /thermostat` answers with the last state
//! as JSON. On the `sim` board the room warms and cools on a ten-minute "day" and the fan
//! really cools it.

use perch_sdk::{App, Request, Response, Result, config, gpio, kv, log, sensors, telemetry};

struct Thermostat;

impl App for Thermostat {
    fn on_tick() -> Result<()> {
        let threshold: f64 = config::parse("threshold-c")?;
        let hysteresis: f64 = config::parse("hysteresis-c")?;
        let t = sensors::read("room-temp")?;
        let was_on = kv::get_string("fan")?.as_deref() == Some("on");
        let on = fan_should_run(t.value, was_on, threshold, hysteresis);
        if on != was_on {
            gpio::write("fan", on)?;
            kv::set("fan", if on { "on" } else { "off" })?;
            log::info(format!(
                "{:.2} {}: fan {}",
                t.value,
                t.unit,
                if on { "on" } else { "off" }
            ));
        }
        let state = format!("{{\"t\":{:.2},\"fan\":{on},\"at\":{}}}", t.value, t.timestamp_ms);
        telemetry::publish("climate", &state)?;
        kv::set("state", &state)?;
        Ok(())
    }

    fn on_http(_request: Request) -> Response {
        match kv::get_string("state") {
            Ok(Some(state)) => Response::json(200, state),
            Ok(None) => Response::json(503, r#"{"error":"no reading yet"}"#),
            Err(e) => Response::json(500, format!("{{\"error\":\"{e}\"}}")),
        }
    }
}

/// Hysteresis: on above `threshold`, off below `threshold - hysteresis`, otherwise unchanged.
fn fan_should_run(t: f64, was_on: bool, threshold: f64, hysteresis: f64) -> bool {
    if t > threshold {
        true
    } else if t < threshold - hysteresis {
        false
    } else {
        was_on
    }
}

perch_sdk::export!(Thermostat);

#[cfg(test)]
mod tests {
    use super::fan_should_run;

    #[test]
    fn the_fan_does_not_chatter_around_the_threshold() {
        assert!(fan_should_run(25.5, false, 25.0, 1.0));
        assert!(fan_should_run(24.5, true, 25.0, 1.0), "stays on inside the band");
        assert!(!fan_should_run(24.5, false, 25.0, 1.0), "stays off inside the band");
        assert!(!fan_should_run(23.9, true, 25.0, 1.0));
    }
}
