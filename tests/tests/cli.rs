//! The command line without privileges: configuration errors are clear and name their line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use switchyard_tests::{run, switchyard_bin};

#[test]
fn unknown_xml_is_refused_with_element_and_line() {
    let dir = std::env::temp_dir().join(format!("sy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xml = dir.join("net.xml");
    std::fs::write(
        &xml,
        "<network>\n  <name>lab</name>\n  <portgroup name='x'/>\n</network>\n",
    )
    .unwrap();
    let out = run(&[
        switchyard_bin().to_str().unwrap(),
        "run",
        xml.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: unsupported element <portgroup>"),
        "{err}"
    );
}

#[test]
fn bad_tap_spec_is_refused() {
    let out = run(&[
        switchyard_bin().to_str().unwrap(),
        "run",
        "--tap",
        "eth0=zz:zz",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad MAC"));
}
