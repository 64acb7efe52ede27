//! libvirt's network XML (`formatnetwork`), the configuration switchyard takes.
//!
//! Users already have these files (`virsh net-dumpxml`, `/usr/share/libvirt/networks/
//! default.xml`), so they are read as libvirt writes them. Every element and attribute is
//! checked against what switchyard knows: anything else is an error naming it and its line,
//! never silently dropped, because a silently ignored `<forward>` or `<dhcp>` would leave a
//! user debugging the wrong thing.

use std::net::Ipv4Addr;

/// The XML namespace of switchyard's own extensions (prefix `sy:` by convention).
pub const SY_NS: &str = "urn:switchyard:network:1";

/// libvirt's `/usr/share/libvirt/networks/default.xml`, embedded.
pub const DEFAULT_XML: &str = include_str!("default.xml");

/// A network definition that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    Syntax(String),
    #[error("line {line}: unsupported element <{element}>{context}")]
    UnknownElement {
        element: String,
        line: u32,
        context: String,
    },
    #[error("line {line}: unsupported attribute '{attribute}' on <{element}>")]
    UnknownAttribute {
        element: String,
        attribute: String,
        line: u32,
    },
    #[error("line {line}: <{element}> {attribute}='{value}': {why}")]
    BadValue {
        element: String,
        attribute: String,
        value: String,
        line: u32,
        why: String,
    },
    #[error("line {line}: <{element}> is missing {what}")]
    Missing {
        element: String,
        what: String,
        line: u32,
    },
}

/// What switchyard knows of libvirt's schema: an element, its attributes, its children.
struct Schema {
    name: &'static str,
    attrs: &'static [&'static str],
    children: &'static [Schema],
    /// Text content is allowed (e.g. `<name>`).
    text: bool,
}

const fn leaf(name: &'static str, attrs: &'static [&'static str]) -> Schema {
    Schema {
        name,
        attrs,
        children: &[],
        text: false,
    }
}

const fn text(name: &'static str) -> Schema {
    Schema {
        name,
        attrs: &[],
        children: &[],
        text: true,
    }
}

const NETWORK: Schema = Schema {
    name: "network",
    attrs: &["ipv6", "trustGuestRxFilters", "connections"],
    text: false,
    children: &[
        text("name"),
        text("uuid"),
        leaf(
            "bridge",
            &["name", "stp", "delay", "macTableManager", "zone"],
        ),
        leaf("mac", &["address"]),
        leaf("mtu", &["size"]),
        leaf("domain", &["name", "localOnly", "register"]),
        Schema {
            name: "forward",
            attrs: &["mode", "dev"],
            text: false,
            children: &[
                Schema {
                    name: "nat",
                    attrs: &["ipv6"],
                    text: false,
                    children: &[
                        leaf("address", &["start", "end"]),
                        leaf("port", &["start", "end"]),
                    ],
                },
                leaf("interface", &["dev"]),
            ],
        },
        Schema {
            name: "ip",
            attrs: &["address", "netmask", "prefix", "family", "localPtr"],
            text: false,
            children: &[Schema {
                name: "dhcp",
                attrs: &[],
                text: false,
                children: &[
                    Schema {
                        name: "range",
                        attrs: &["start", "end"],
                        text: false,
                        children: &[leaf("lease", &["expiry", "unit"])],
                    },
                    Schema {
                        name: "host",
                        attrs: &["mac", "id", "name", "ip"],
                        text: false,
                        children: &[leaf("lease", &["expiry", "unit"])],
                    },
                ],
            }],
        },
        Schema {
            name: "dns",
            attrs: &["enable", "forwardPlainNames"],
            text: false,
            children: &[
                leaf("forwarder", &["addr", "domain"]),
                Schema {
                    name: "host",
                    attrs: &["ip"],
                    text: false,
                    children: &[text("hostname")],
                },
                leaf("txt", &["name", "value"]),
                leaf(
                    "srv",
                    &[
                        "service", "protocol", "domain", "target", "port", "priority", "weight",
                    ],
                ),
            ],
        },
    ],
};

/// switchyard's extensions, in [`SY_NS`], allowed directly under `<network>`. None is
/// implemented yet; the NAT and rootless issues add `uplink`, `egress`, `forward`.
const SY_EXTENSIONS: &[Schema] = &[];

fn line_of(node: roxmltree::Node<'_, '_>) -> u32 {
    node.document().text_pos_at(node.range().start).row
}

fn validate(node: roxmltree::Node<'_, '_>, schema: &Schema) -> Result<(), XmlError> {
    for attr in node.attributes() {
        if attr.namespace().is_none() && !schema.attrs.contains(&attr.name()) {
            return Err(XmlError::UnknownAttribute {
                element: schema.name.to_string(),
                attribute: attr.name().to_string(),
                line: line_of(node),
            });
        }
    }
    for child in node.children() {
        if child.is_text() {
            let blank = child.text().is_none_or(|t| t.trim().is_empty());
            if !blank && !schema.text {
                return Err(XmlError::UnknownElement {
                    element: format!("{} text", schema.name),
                    line: line_of(child),
                    context: String::new(),
                });
            }
            continue;
        }
        if !child.is_element() {
            continue;
        }
        let tag = child.tag_name();
        let (known, context) = if tag.namespace() == Some(SY_NS) {
            (
                SY_EXTENSIONS
                    .iter()
                    .find(|s| s.name == tag.name() && schema.name == "network"),
                format!(" (switchyard extension in {SY_NS})"),
            )
        } else if tag.namespace().is_none() {
            (
                schema.children.iter().find(|s| s.name == tag.name()),
                format!(" inside <{}>", schema.name),
            )
        } else {
            (
                None,
                format!(" in namespace {}", tag.namespace().unwrap_or("")),
            )
        };
        let Some(child_schema) = known else {
            return Err(XmlError::UnknownElement {
                element: tag.name().to_string(),
                line: line_of(child),
                context,
            });
        };
        validate(child, child_schema)?;
    }
    Ok(())
}

/// `<forward mode=...>`; absent means an isolated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardMode {
    Nat,
    Bridge,
    Route,
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub mode: ForwardMode,
    pub dev: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpDef {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub dhcp_ranges: Vec<DhcpRange>,
}

/// The parts of a network definition switchyard uses so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    pub name: String,
    pub uuid: Option<String>,
    pub bridge: Option<String>,
    pub mac: Option<datapath::MacAddr>,
    pub mtu: Option<u16>,
    pub forward: Option<Forward>,
    pub ips: Vec<IpDef>,
    pub has_dns: bool,
}

fn attr_parse<T: std::str::FromStr>(
    node: roxmltree::Node<'_, '_>,
    attr: &str,
) -> Result<Option<T>, XmlError>
where
    T::Err: std::fmt::Display,
{
    let Some(value) = node.attribute(attr) else {
        return Ok(None);
    };
    value
        .parse()
        .map(Some)
        .map_err(|e: T::Err| XmlError::BadValue {
            element: node.tag_name().name().to_string(),
            attribute: attr.to_string(),
            value: value.to_string(),
            line: line_of(node),
            why: e.to_string(),
        })
}

fn required<T>(node: roxmltree::Node<'_, '_>, what: &str, v: Option<T>) -> Result<T, XmlError> {
    v.ok_or_else(|| XmlError::Missing {
        element: node.tag_name().name().to_string(),
        what: what.to_string(),
        line: line_of(node),
    })
}

fn netmask_to_prefix(node: roxmltree::Node<'_, '_>, mask: Ipv4Addr) -> Result<u8, XmlError> {
    let bits = u32::from(mask);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(XmlError::BadValue {
            element: "ip".into(),
            attribute: "netmask".into(),
            value: mask.to_string(),
            line: line_of(node),
            why: "not a contiguous netmask".into(),
        });
    }
    Ok(bits.leading_ones() as u8)
}

impl NetworkDef {
    /// Parses and checks a libvirt network definition.
    pub fn parse(xml: &str) -> Result<NetworkDef, XmlError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Syntax(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "network" || root.tag_name().namespace().is_some() {
            return Err(XmlError::UnknownElement {
                element: root.tag_name().name().to_string(),
                line: line_of(root),
                context: " (the root must be <network>)".into(),
            });
        }
        validate(root, &NETWORK)?;

        let child = |name: &str| root.children().find(|c| c.has_tag_name(name));
        let name_node = required(root, "<name>", child("name"))?;
        let name = name_node.text().unwrap_or("").trim().to_string();
        if name.is_empty() || name.contains('/') {
            return Err(XmlError::BadValue {
                element: "name".into(),
                attribute: "text".into(),
                value: name,
                line: line_of(name_node),
                why: "a network name is non-empty and has no '/'".into(),
            });
        }
        let forward = match child("forward") {
            None => None,
            Some(f) => {
                let mode = match f.attribute("mode").unwrap_or("nat") {
                    "nat" => ForwardMode::Nat,
                    "bridge" => ForwardMode::Bridge,
                    "route" => ForwardMode::Route,
                    "open" => ForwardMode::Open,
                    other => {
                        return Err(XmlError::BadValue {
                            element: "forward".into(),
                            attribute: "mode".into(),
                            value: other.into(),
                            line: line_of(f),
                            why: "switchyard supports nat, bridge, route and open".into(),
                        });
                    }
                };
                Some(Forward {
                    mode,
                    dev: f.attribute("dev").map(str::to_string),
                })
            }
        };
        let mut ips = Vec::new();
        for ip in root.children().filter(|c| c.has_tag_name("ip")) {
            let address: Ipv4Addr = required(ip, "address", attr_parse(ip, "address")?)?;
            let prefix = match (
                attr_parse::<Ipv4Addr>(ip, "netmask")?,
                attr_parse::<u8>(ip, "prefix")?,
            ) {
                (Some(mask), _) => netmask_to_prefix(ip, mask)?,
                (None, Some(p)) if p <= 32 => p,
                (None, Some(p)) => {
                    return Err(XmlError::BadValue {
                        element: "ip".into(),
                        attribute: "prefix".into(),
                        value: p.to_string(),
                        line: line_of(ip),
                        why: "an IPv4 prefix is at most 32".into(),
                    });
                }
                (None, None) => 24,
            };
            let mut dhcp_ranges = Vec::new();
            for range in ip
                .children()
                .filter(|c| c.has_tag_name("dhcp"))
                .flat_map(|d| d.children().filter(|c| c.has_tag_name("range")))
            {
                dhcp_ranges.push(DhcpRange {
                    start: required(range, "start", attr_parse(range, "start")?)?,
                    end: required(range, "end", attr_parse(range, "end")?)?,
                });
            }
            ips.push(IpDef {
                address,
                prefix,
                dhcp_ranges,
            });
        }
        Ok(NetworkDef {
            name,
            uuid: child("uuid")
                .and_then(|n| n.text())
                .map(|t| t.trim().to_string()),
            bridge: child("bridge")
                .and_then(|b| b.attribute("name"))
                .map(str::to_string),
            mac: match child("mac") {
                Some(m) => attr_parse(m, "address")?,
                None => None,
            },
            mtu: match child("mtu") {
                Some(m) => attr_parse(m, "size")?,
                None => None,
            },
            forward,
            ips,
            has_dns: child("dns").is_some(),
        })
    }

    /// The gateway the engine serves: the first `<ip>`, with `<mac>` or a MAC derived from
    /// the network's name.
    pub fn gateway(&self) -> Option<datapath::gateway::GatewayConfig> {
        let ip = self.ips.first()?;
        Some(datapath::gateway::GatewayConfig {
            mac: self
                .mac
                .unwrap_or_else(|| datapath::gateway::GatewayConfig::mac_for_network(&self.name)),
            ip: ip.address,
            prefix: ip.prefix,
        })
    }

    /// Parts of this definition the engine does not carry out yet, one line each, so `run`
    /// can say so plainly instead of pretending.
    pub fn not_yet_implemented(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if let Some(f) = &self.forward {
            missing.push(format!(
                "<forward mode='{}'>: forwarding beyond the switch is not implemented yet; \
                 guests reach each other only",
                match f.mode {
                    ForwardMode::Nat => "nat",
                    ForwardMode::Bridge => "bridge",
                    ForwardMode::Route => "route",
                    ForwardMode::Open => "open",
                }
            ));
        }
        for ip in self.ips.iter().skip(1) {
            missing.push(format!(
                "<ip address='{}'>: only the first <ip> is served",
                ip.address
            ));
        }
        for ip in &self.ips {
            if !ip.dhcp_ranges.is_empty() {
                missing.push("<dhcp>: DHCP is not served yet; give guests static addresses".into());
            }
        }
        if self.has_dns {
            missing.push("<dns>: DNS is not served yet".into());
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirts_default_network() {
        let net = NetworkDef::parse(DEFAULT_XML).unwrap();
        assert_eq!(net.name, "default");
        assert_eq!(net.bridge.as_deref(), Some("virbr0"));
        assert_eq!(
            net.forward,
            Some(Forward {
                mode: ForwardMode::Nat,
                dev: None
            })
        );
        assert_eq!(
            net.ips,
            vec![IpDef {
                address: Ipv4Addr::new(192, 168, 122, 1),
                prefix: 24,
                dhcp_ranges: vec![DhcpRange {
                    start: Ipv4Addr::new(192, 168, 122, 2),
                    end: Ipv4Addr::new(192, 168, 122, 254),
                }],
            }]
        );
    }

    #[test]
    fn parses_an_isolated_network_with_the_usual_extras() {
        let xml = r#"<network>
  <name>isolated</name>
  <uuid>5d1d6a3e-0c2a-4b47-9a8e-2f0f7a3a9c11</uuid>
  <bridge name='virbr1' stp='on' delay='0'/>
  <mac address='52:54:00:0a:0b:0c'/>
  <mtu size='9000'/>
  <domain name='lab'/>
  <ip address='10.10.0.1' prefix='24'>
    <dhcp>
      <range start='10.10.0.100' end='10.10.0.199'><lease expiry='2' unit='hours'/></range>
      <host mac='52:54:00:00:00:10' name='db' ip='10.10.0.10'/>
    </dhcp>
  </ip>
</network>"#;
        let net = NetworkDef::parse(xml).unwrap();
        assert_eq!(net.forward, None);
        assert_eq!(net.mtu, Some(9000));
        assert_eq!(net.ips[0].prefix, 24);
        assert_eq!(net.ips[0].dhcp_ranges.len(), 1);
    }

    #[test]
    fn unknown_elements_and_attributes_are_named_with_their_line() {
        let xml = "<network>\n  <name>x</name>\n  <vlan trunk='yes'/>\n</network>";
        let err = NetworkDef::parse(xml).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 3: unsupported element <vlan> inside <network>"
        );

        let xml = "<network>\n  <name>x</name>\n  <bridge name='b' color='red'/>\n</network>";
        let err = NetworkDef::parse(xml).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 3: unsupported attribute 'color' on <bridge>"
        );

        let xml =
            format!("<network xmlns:sy='{SY_NS}'>\n<name>x</name>\n<sy:teleport/>\n</network>");
        let err = NetworkDef::parse(&xml).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("line 3: unsupported element <teleport> (switchyard"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for (xml, needle) in [
            (
                "<network><ip address='1.2.3.4' netmask='255.0.255.0'/><name>x</name></network>",
                "contiguous",
            ),
            (
                "<network><name>x</name><forward mode='hostdev'/></network>",
                "hostdev",
            ),
            ("<network><name>x</name><mtu size='big'/></network>", "big"),
            (
                "<network><name>x</name><mac address='52:54:00'/></network>",
                "52:54:00",
            ),
            ("<network><bridge name='b'/></network>", "missing <name>"),
            ("<network><name>x</name", "well-formed"),
            ("<net><name>x</name></net>", "root must be"),
        ] {
            let err = NetworkDef::parse(xml).unwrap_err().to_string();
            assert!(err.contains(needle), "{xml}: {err}");
        }
    }

    #[test]
    fn says_what_is_not_implemented_yet() {
        let net = NetworkDef::parse(DEFAULT_XML).unwrap();
        let missing = net.not_yet_implemented();
        assert!(missing.iter().any(|m| m.contains("forward mode='nat'")));
        assert!(missing.iter().any(|m| m.contains("DHCP")));
    }
}
