use perch_store::*;
#[test]
fn scratch() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("b");
    {
        let s = SledStore::open(&b, &SledOptions::default()).unwrap();
        for i in 0..400u32 {
            let doc = format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "p".repeat(20_000));
            s.commit_desired(doc.as_bytes()).unwrap();
        }
    }
    let len = std::fs::metadata(b.join("db")).unwrap().len();
    eprintln!("db len {len}");
    for f in std::fs::read_dir(&b).unwrap() { eprintln!("{:?}", f.unwrap().path()); }
    for seg in 0..10u64 {
        let c = dir.path().join(format!("c{seg}"));
        std::fs::create_dir(&c).unwrap();
        for f in std::fs::read_dir(&b).unwrap() { let p = f.unwrap().path(); if p.is_file() { std::fs::copy(&p, c.join(p.file_name().unwrap())).unwrap(); } }
        std::fs::create_dir(c.join("blobs")).unwrap();
        let mut bytes = std::fs::read(c.join("db")).unwrap();
        let at = (seg * 524288 + 1000) as usize;
        for k in 0..64 { bytes[at + k] ^= 0x5A; }
        std::fs::write(c.join("db"), bytes).unwrap();
        let r = std::panic::catch_unwind(|| SledStore::open(&c, &SledOptions::default()).map(|s| { let j = s.journal().unwrap(); format!("cur {:?} prev {:?}", j.current.map(|e| e.map(|e| String::from_utf8_lossy(&e.doc[..12]).into_owned())), j.previous.map(|e| e.map(|e| e.generation))) }).map_err(|e| e.to_string()));
        eprintln!("flip in segment {seg}: {:?}", r);
    }
}
