//! The state directory: what outlives the daemon and the machine, as libvirt keeps it under
//! `/var/lib/libvirt`: defined networks (`networks/NAME.xml`, the XML as defined plus the
//! `<uuid>` and `<mac>` libvirt would generate), autostart marks (`autostart/NAME`), and the
//! DHCP lease files (`NAME.leases`, written by the running engine).
//!
//! Every write goes through a temporary file, fsync and rename, so a crash leaves either the
//! old file or the new one; a definition is parsed and checked before anything is written.

use crate::network::NetworkDef;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// A network name becomes a file name: refuse what could escape the directory.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\0', '\n'])
        || name.len() > 200
    {
        return Err(format!("invalid network name {name:?}"));
    }
    Ok(())
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn network_file(&self, name: &str) -> PathBuf {
        self.root.join("networks").join(format!("{name}.xml"))
    }

    fn autostart_file(&self, name: &str) -> PathBuf {
        self.root.join("autostart").join(name)
    }

    /// Parses and checks `xml`, completes it with a uuid and MAC when it has none, and stores
    /// it (replacing an earlier definition of the same name, as `virsh net-define` does).
    /// Returns the definition and the stored XML.
    pub fn define(&self, xml: &str) -> Result<(NetworkDef, String), String> {
        let def = NetworkDef::parse(xml).map_err(|e| e.to_string())?;
        check_name(&def.name)?;
        def.dhcp_config()?;
        let stored = complete_xml(xml, &def)?;
        let def = NetworkDef::parse(&stored).map_err(|e| e.to_string())?;
        let path = self.network_file(&def.name);
        std::fs::create_dir_all(path.parent().unwrap_or(&self.root))
            .map_err(|e| format!("{}: {e}", self.root.display()))?;
        datapath::io::write_durably(&path, stored.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((def, stored))
    }

    /// Forgets the definition and its autostart mark (the lease file stays, as libvirt's).
    pub fn undefine(&self, name: &str) -> Result<(), String> {
        check_name(name)?;
        let path = self.network_file(name);
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("network '{name}' is not defined"),
            _ => format!("{}: {e}", path.display()),
        })?;
        let _ = std::fs::remove_file(self.autostart_file(name));
        Ok(())
    }

    /// The stored XML of `name`.
    pub fn xml(&self, name: &str) -> Result<String, String> {
        check_name(name)?;
        std::fs::read_to_string(self.network_file(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("network '{name}' is not defined"),
            _ => format!("network '{name}': {e}"),
        })
    }

    pub fn is_defined(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.network_file(name).is_file()
    }

    /// Names of the defined networks, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("networks"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".xml").map(str::to_string)
            })
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names
    }

    pub fn autostart(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.autostart_file(name).is_file()
    }

    pub fn set_autostart(&self, name: &str, on: bool) -> Result<(), String> {
        if !self.is_defined(name) {
            return Err(format!(
                "network '{name}' is not defined (autostart needs a persistent network)"
            ));
        }
        let path = self.autostart_file(name);
        if on {
            std::fs::create_dir_all(path.parent().unwrap_or(&self.root))
                .map_err(|e| format!("{}: {e}", self.root.display()))?;
            datapath::io::write_durably(&path, b"").map_err(|e| format!("{}: {e}", path.display()))
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(format!("{}: {e}", path.display()))
                }
                _ => Ok(()),
            }
        }
    }
}

/// `xml` with a `<uuid>` after `<name>` and a `<mac address>` after `<bridge>` (or the uuid)
/// when it has none: what libvirt adds to a definition, so `net-dumpxml` shows the values the
/// network runs with. Everything else is kept byte for byte.
pub fn complete_xml(xml: &str, def: &NetworkDef) -> Result<String, String> {
    let mut out = xml.to_string();
    let name_end = out
        .find("</name>")
        .map(|i| i + "</name>".len())
        .ok_or("<name> is missing")?;
    let indent = indent_before(&out, name_end);
    if def.uuid.is_none() {
        out.insert_str(name_end, &format!("\n{indent}<uuid>{}</uuid>", new_uuid()));
    }
    if def.mac.is_none() {
        let mac = datapath::gateway::GatewayConfig::mac_for_network(&def.name);
        let after = bridge_end(&out)
            .or_else(|| out.find("</uuid>").map(|i| i + "</uuid>".len()))
            .unwrap_or(name_end);
        out.insert_str(after, &format!("\n{indent}<mac address='{mac}'/>"));
    }
    Ok(out)
}

/// Where the `<bridge .../>` element ends, if there is one.
fn bridge_end(xml: &str) -> Option<usize> {
    let start = xml.find("<bridge")?;
    let close = xml[start..].find("/>")? + start + 2;
    Some(close)
}

/// The whitespace that indents the line holding byte `at`.
fn indent_before(xml: &str, at: usize) -> String {
    let line_start = xml[..at].rfind('\n').map_or(0, |i| i + 1);
    xml[line_start..]
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect()
}

/// A random (version 4) UUID, as libvirt generates for a definition without one.
fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_gets_a_uuid_and_mac_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("sy-state-{}", std::process::id()));
        let state = StateDir::new(&dir);
        let xml = crate::network::DEFAULT_XML.replace("<forward/>", "<forward/>\n  <!-- mine -->");
        let (def, stored) = state.define(&xml).unwrap();
        assert!(def.uuid.is_some() && def.mac.is_some(), "{stored}");
        assert!(stored.contains("<!-- mine -->"));
        let bridge = stored.find("<bridge").unwrap();
        assert!(
            stored[bridge..].find("<mac address=").unwrap() < 80,
            "{stored}"
        );
        // Defining the stored XML again changes nothing: it is complete.
        let (_, again) = state.define(&stored).unwrap();
        assert_eq!(again, stored);
        assert_eq!(state.xml("default").unwrap(), stored);
        assert_eq!(state.names(), ["default"]);
        state.set_autostart("default", true).unwrap();
        assert!(state.autostart("default"));
        state.undefine("default").unwrap();
        assert!(!state.autostart("default") && state.names().is_empty());
        assert!(
            state
                .undefine("default")
                .unwrap_err()
                .contains("not defined")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_definition_writes_nothing() {
        let dir = std::env::temp_dir().join(format!("sy-state-bad-{}", std::process::id()));
        let state = StateDir::new(&dir);
        for bad in [
            "<network><name>x</name",
            "<network><name>x</name><portgroup/></network>",
            "<network><name>x</name><ip address='10.0.0.300'/></network>",
            "<network><name>x</name><ip address='10.0.0.1' prefix='24'><dhcp>\
             <range start='10.0.1.2' end='10.0.1.9'/></dhcp></ip></network>",
            "<network><name>../x</name></network>",
        ] {
            assert!(state.define(bad).is_err(), "{bad}");
        }
        assert!(!dir.exists() || state.names().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
