//! The subject tree, `perch.v1.<device>.…`; MQTT uses the same tree with `/` for `.`.
//! Documented in `docs/protocol.md`.

/// Protocol version prefix.
pub const ROOT: &str = "perch.v1";
/// The JetStream stream a device owns on its local leaf node, holding its outgoing
/// telemetry; the hub's stream sources it.
pub const LEAF_STREAM: &str = "PERCH_OUT";
/// KV bucket of reported states, keyed by device.
pub const REPORTED_BUCKET: &str = "perch-reported";
/// KV bucket of desired states, keyed by device.
pub const DESIRED_BUCKET: &str = "perch-desired";
/// Header carrying the message id JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// `perch.v1.<device>.telemetry.<stream>`
pub fn telemetry(device: &str, stream: &str) -> String {
    format!("{ROOT}.{device}.telemetry.{stream}")
}

/// `perch.v1.<device>.telemetry.>`: every telemetry stream of a device.
pub fn telemetry_all(device: &str) -> String {
    format!("{ROOT}.{device}.telemetry.>")
}

/// `perch.v1.<device>.hb`
pub fn heartbeat(device: &str) -> String {
    format!("{ROOT}.{device}.hb")
}

/// `$KV.perch-reported.<device>`: the reported state, as a put into the KV bucket.
pub fn reported_kv(device: &str) -> String {
    format!("$KV.{REPORTED_BUCKET}.{device}")
}

/// `$KV.perch-desired.<device>`: the device's desired state in the KV bucket.
pub fn desired_kv(device: &str) -> String {
    format!("$KV.{DESIRED_BUCKET}.{device}")
}

/// The message id of outbox record `seq` of `device`: `<device>:<seq>`.
pub fn message_id(device: &str, seq: u64) -> String {
    format!("{device}:{seq}")
}

/// The MQTT topic for a NATS-style subject: `.` becomes `/`.
pub fn mqtt_topic(subject: &str) -> String {
    subject.replace('.', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_one_token_per_level() {
        assert_eq!(
            telemetry("gw-1", "climate"),
            "perch.v1.gw-1.telemetry.climate"
        );
        assert_eq!(telemetry_all("gw-1"), "perch.v1.gw-1.telemetry.>");
        assert_eq!(heartbeat("gw-1"), "perch.v1.gw-1.hb");
        assert_eq!(reported_kv("gw-1"), "$KV.perch-reported.gw-1");
        assert_eq!(message_id("gw-1", 42), "gw-1:42");
        assert_eq!(
            mqtt_topic("perch.v1.gw-1.telemetry.climate"),
            "perch/v1/gw-1/telemetry/climate"
        );
    }
}
