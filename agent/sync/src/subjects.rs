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
/// JetStream object store holding component artifacts, object name = digest.
pub const OBJECT_BUCKET: &str = "perch-components";
/// Header naming a command, echoed in its answer; a repeated id is answered once.
pub const CMD_ID: &str = "Perch-Cmd-Id";

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

/// `perch.v1.<device>.cmd.<op>`: a command from the fleet (request/reply).
pub fn command(device: &str, op: &str) -> String {
    format!("{ROOT}.{device}.cmd.{op}")
}

/// `perch.v1.<device>.cmd.*`: every command of a device.
pub fn commands(device: &str) -> String {
    format!("{ROOT}.{device}.cmd.*")
}

/// `perch.v1.<device>.in.`: the prefix of messages from the fleet to the device's local
/// bus; what follows it is the local subject.
pub fn inbound_prefix(device: &str) -> String {
    format!("{ROOT}.{device}.in.")
}

/// `perch.v1.<device>.out.<subject>`: local-bus message `subject` on its way to the fleet.
pub fn outbound(device: &str, subject: &str) -> String {
    format!("{ROOT}.{device}.out.{subject}")
}

/// The stream of object store `bucket`.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// `$O.<bucket>.M.<name>`: an object's metadata; the name is base64url-encoded (with
/// padding), as every object store client does.
pub fn object_meta(bucket: &str, name: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(name);
    format!("$O.{bucket}.M.{encoded}")
}

/// `$O.<bucket>.C.<nuid>`: an object's chunks, in order.
pub fn object_chunks(bucket: &str, nuid: &str) -> String {
    format!("$O.{bucket}.C.{nuid}")
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
        assert_eq!(command("gw-1", "status"), "perch.v1.gw-1.cmd.status");
        assert_eq!(commands("gw-1"), "perch.v1.gw-1.cmd.*");
        assert_eq!(inbound_prefix("gw-1"), "perch.v1.gw-1.in.");
        assert_eq!(outbound("gw-1", "alarm.fan"), "perch.v1.gw-1.out.alarm.fan");
        // The name encoding every object store client uses (nats.go, async-nats).
        assert_eq!(
            object_meta("perch-components", "sha256:ab"),
            "$O.perch-components.M.c2hhMjU2OmFi"
        );
        assert_eq!(
            mqtt_topic("perch.v1.gw-1.telemetry.climate"),
            "perch/v1/gw-1/telemetry/climate"
        );
    }
}
