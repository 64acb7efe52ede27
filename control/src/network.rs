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
/// Leases one MAC may hold under different DHCP client identifiers unless `<sy:guard
/// leases-per-mac>` says otherwise: room for a guest that reboots into another system (a new
/// identifier before the old lease ends), not for one that drains the pool.
pub const DEFAULT_LEASES_PER_MAC: u32 = 8;

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

/// switchyard's extensions, in [`SY_NS`], allowed directly under `<network>`:
/// `<sy:uplink prefix gateway mac rx>` (the external address's subnet and next hop, how frames
/// are received) and
/// `<sy:nat filtering max-flows max-flows-per-guest>`,
/// `<sy:egress mode='socket|packet'>` (how NATed flows leave),
/// `<sy:host-loopback/>` (the gateway address stands for the host's 127.0.0.1) and
/// `<sy:forward proto host guest>` (a host port forwarded to a guest) and
/// `<sy:guard clean-traffic dhcp-per-second dns-per-second broadcast-per-second
/// leases-per-mac>` (hostile guests: spoofing protection and per-port caps) and
/// `<sy:datapath workers cpus realtime>` (the network's threads and where they run).
const SY_EXTENSIONS: &[Schema] = &[
    leaf("datapath", &["workers", "cpus", "realtime"]),
    leaf("egress", &["mode"]),
    leaf(
        "guard",
        &[
            "clean-traffic",
            "dhcp-per-second",
            "dns-per-second",
            "broadcast-per-second",
            "leases-per-mac",
        ],
    ),
    leaf("host-loopback", &[]),
    leaf("forward", &["proto", "host", "guest"]),
    leaf("uplink", &["prefix", "gateway", "mac", "rx"]),
    leaf("nat", &["filtering", "max-flows", "max-flows-per-guest"]),
    leaf(
        "port",
        &[
            "type", "target", "netns", "mac", "model", "socket", "filter",
        ],
    ),
];

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
    /// `<nat><address start end>`.
    pub nat_address: Option<(Ipv4Addr, Ipv4Addr)>,
    /// `<nat><port start end>`.
    pub nat_ports: Option<(u16, u16)>,
}

/// `<sy:uplink>`: where the external address lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyUplink {
    pub prefix: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    pub mac: Option<datapath::MacAddr>,
    pub rx: Option<UplinkRx>,
}

/// How the uplink receives: `read` (the default: one `read` per frame, woken per frame) or
/// `ring` (a `TPACKET_V3` ring: no system call per frame, but the kernel hands a block over
/// only when it is full or 1 ms old, so a lone frame waits; on a veth that costs 10x in round
/// trip and new connections/s, see benches/RESULTS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UplinkRx {
    Ring,
    #[default]
    Read,
}

impl std::str::FromStr for UplinkRx {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ring" => Ok(UplinkRx::Ring),
            "read" => Ok(UplinkRx::Read),
            _ => Err("expected 'ring' or 'read'".into()),
        }
    }
}

/// `<sy:nat>`: NAT behaviour beyond what libvirt's XML says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyNat {
    pub filtering: Option<datapath::nat::Filtering>,
    pub max_flows: Option<usize>,
    pub max_flows_per_guest: Option<usize>,
}

/// `<sy:datapath workers cpus realtime>`: the network's threads, as `run --workers`,
/// `--cpus` and `--realtime` (each attribute given here wins over the command line's, so
/// one daemon can run each network on its own cores).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyDatapath {
    pub workers: Option<u16>,
    pub cpus: Option<Vec<usize>>,
    pub realtime: Option<u8>,
}

impl SyDatapath {
    /// The threads' placement: the command line's, with what this element sets.
    pub fn placement(&self, base: &datapath::io::Placement) -> datapath::io::Placement {
        datapath::io::Placement {
            cpus: self.cpus.clone().unwrap_or_else(|| base.cpus.clone()),
            realtime: self.realtime.or(base.realtime),
        }
    }
}

fn parse_sy_datapath(node: roxmltree::Node<'_, '_>) -> Result<SyDatapath, XmlError> {
    let bad = |attribute: &str, value: &str, why: String| XmlError::BadValue {
        element: "datapath".into(),
        attribute: attribute.into(),
        value: value.into(),
        line: line_of(node),
        why,
    };
    let workers = attr_parse::<u16>(node, "workers")?;
    if let Some(n) = workers.filter(|n| !(1..=64).contains(n)) {
        return Err(bad("workers", &n.to_string(), "expected 1 to 64".into()));
    }
    let realtime = attr_parse::<u8>(node, "realtime")?;
    if let Some(p) = realtime.filter(|p| !(1..=99).contains(p)) {
        return Err(bad(
            "realtime",
            &p.to_string(),
            "expected a priority from 1 to 99".into(),
        ));
    }
    let cpus = match node.attribute("cpus") {
        Some(text) => {
            Some(datapath::io::placement::parse_cpus(text).map_err(|why| bad("cpus", text, why))?)
        }
        None => None,
    };
    Ok(SyDatapath {
        workers,
        cpus,
        realtime,
    })
}

/// How NATed flows leave the host (`<sy:egress mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Through host sockets: no address of its own, no privilege.
    Socket,
    /// Rewritten packets on the uplink NIC, from the `<nat><address>`.
    Packet,
}

impl std::str::FromStr for Egress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "socket" => Ok(Egress::Socket),
            "packet" => Ok(Egress::Packet),
            _ => Err("expected 'socket' or 'packet'".into()),
        }
    }
}

/// `<sy:forward proto host guest>`: connections to `host` reach `guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub proto: &'static str,
    pub host: std::net::SocketAddr,
    pub guest: std::net::SocketAddrV4,
}

impl PortForward {
    pub fn to_datapath(self) -> datapath::io::egress::Forward {
        datapath::io::egress::Forward {
            proto: self.proto,
            host: self.host,
            guest: self.guest,
        }
    }
}

/// `<lease expiry='N' unit='seconds|minutes|hours'/>` (libvirt: unit defaults to minutes;
/// expiry 0 means the lease never expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTime {
    Seconds(u32),
    Infinite,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub lease: Option<LeaseTime>,
}

/// `<dhcp><host mac name ip>`: a reservation (or only a name) for one MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: datapath::MacAddr,
    pub name: Option<String>,
    pub ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpDef {
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// `<dhcp>` is present (even empty).
    pub dhcp: bool,
    pub dhcp_ranges: Vec<DhcpRange>,
    pub dhcp_hosts: Vec<DhcpHost>,
}

fn lease_time(node: roxmltree::Node<'_, '_>) -> Result<Option<LeaseTime>, XmlError> {
    let Some(lease) = node.children().find(|c| c.has_tag_name("lease")) else {
        return Ok(None);
    };
    let expiry: u64 = required(lease, "expiry", attr_parse(lease, "expiry")?)?;
    let unit = match lease.attribute("unit").unwrap_or("minutes") {
        "seconds" => 1,
        "minutes" => 60,
        "hours" => 3600,
        other => {
            return Err(XmlError::BadValue {
                element: "lease".into(),
                attribute: "unit".into(),
                value: other.into(),
                line: line_of(lease),
                why: "expected seconds, minutes or hours".into(),
            });
        }
    };
    Ok(Some(match expiry * unit {
        0 => LeaseTime::Infinite,
        secs => LeaseTime::Seconds(secs.min(u32::MAX as u64 - 1) as u32),
    }))
}

/// `<dns>`: what the gateway's DNS serves beyond DHCP's names (libvirt's dnsmasq options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDef {
    /// `enable='no'` turns DNS off.
    pub enable: bool,
    /// `forwardPlainNames='no'` is dnsmasq's `domain-needed`.
    pub forward_plain_names: bool,
    /// `<forwarder domain addr>`: (domain, address); a domain without an address is answered
    /// locally only.
    pub forwarders: Vec<(Option<String>, Option<std::net::IpAddr>)>,
    /// `<host ip><hostname>..</hostname></host>` (libvirt's addn-hosts).
    pub hosts: Vec<(Ipv4Addr, Vec<String>)>,
    /// `<txt name value>`.
    pub txt: Vec<(String, String)>,
    /// `<srv service protocol domain target port priority weight>`.
    pub srv: Vec<dhcp_dns::dns::SrvRecord>,
}

impl Default for DnsDef {
    fn default() -> Self {
        DnsDef {
            enable: true,
            forward_plain_names: true,
            forwarders: Vec::new(),
            hosts: Vec::new(),
            txt: Vec::new(),
            srv: Vec::new(),
        }
    }
}

fn yes_no(node: roxmltree::Node<'_, '_>, attr: &str, default: bool) -> Result<bool, XmlError> {
    match node.attribute(attr) {
        None => Ok(default),
        Some("yes") => Ok(true),
        Some("no") => Ok(false),
        Some(other) => Err(XmlError::BadValue {
            element: node.tag_name().name().into(),
            attribute: attr.into(),
            value: other.into(),
            line: line_of(node),
            why: "expected yes or no".into(),
        }),
    }
}

fn parse_dns(dns: roxmltree::Node<'_, '_>) -> Result<DnsDef, XmlError> {
    let mut def = DnsDef {
        enable: yes_no(dns, "enable", true)?,
        forward_plain_names: yes_no(dns, "forwardPlainNames", true)?,
        ..DnsDef::default()
    };
    for node in dns.children().filter(roxmltree::Node::is_element) {
        match node.tag_name().name() {
            "forwarder" => def.forwarders.push((
                node.attribute("domain").map(str::to_string),
                attr_parse(node, "addr")?,
            )),
            "host" => def.hosts.push((
                required(node, "ip", attr_parse(node, "ip")?)?,
                node.children()
                    .filter(|c| c.has_tag_name("hostname"))
                    .filter_map(|c| c.text())
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )),
            "txt" => def.txt.push((
                required(node, "name", node.attribute("name").map(str::to_string))?,
                node.attribute("value").unwrap_or_default().to_string(),
            )),
            "srv" => def.srv.push(dhcp_dns::dns::SrvRecord {
                service: required(
                    node,
                    "service",
                    node.attribute("service").map(str::to_string),
                )?,
                protocol: required(
                    node,
                    "protocol",
                    node.attribute("protocol").map(str::to_string),
                )?,
                domain: node.attribute("domain").map(str::to_string),
                target: node.attribute("target").map(str::to_string),
                port: attr_parse(node, "port")?.unwrap_or(0),
                priority: attr_parse(node, "priority")?.unwrap_or(0),
                weight: attr_parse(node, "weight")?.unwrap_or(0),
            }),
            _ => {}
        }
    }
    Ok(def)
}

/// `xml` with one more `<sy:port>` (a tap attached at every start), declaring switchyard's
/// namespace on `<network>` if it is not yet.
pub fn add_port_xml(
    xml: &str,
    target: &str,
    netns: Option<&str>,
    mac: Option<&str>,
    filter: Option<&str>,
) -> String {
    let mut element = format!("<sy:port type='tap' target='{}'", xml_escape(target));
    if let Some(ns) = netns {
        element.push_str(&format!(" netns='{}'", xml_escape(ns)));
    }
    if let Some(mac) = mac {
        element.push_str(&format!(" mac='{}'", xml_escape(mac)));
    }
    if let Some(filter) = filter {
        element.push_str(&format!(" filter='{}'", xml_escape(filter)));
    }
    element.push_str(" model='virtio'/>");
    add_sy_element(xml, &element)
}

/// `xml` with one more `<sy:port type='stream'>` (a QEMU socket made at every start).
pub fn add_stream_xml(xml: &str, socket: &str) -> String {
    let element = format!("<sy:port type='stream' socket='{}'/>", xml_escape(socket));
    add_sy_element(xml, &element)
}

fn xml_escape(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
}

/// `element` appended inside `<network>`, with `xmlns:sy` declared if it is not yet.
fn add_sy_element(xml: &str, element: &str) -> String {
    let mut out = xml.to_string();
    if let Some(end) = out.rfind("</network>") {
        out.insert_str(end, &format!("  {element}\n"));
    }
    if !out.contains(SY_NS)
        && let Some(at) = out.find("<network").map(|i| i + "<network".len())
    {
        out.insert_str(at, &format!(" xmlns:sy='{SY_NS}'"));
    }
    out
}

/// `xml` without the `<sy:port>` whose target (or MAC) is `target`; `None` if it has none.
pub fn remove_port_xml(xml: &str, target: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let port = doc.root_element().children().find(|c| {
        c.has_tag_name((SY_NS, "port"))
            && (c.attribute("target") == Some(target)
                || c.attribute("socket") == Some(target)
                || c.attribute("mac")
                    .is_some_and(|m| m.eq_ignore_ascii_case(target)))
    })?;
    let range = port.range();
    // Take the indentation and line break before it too.
    let start = xml[..range.start].trim_end_matches([' ', '\t']).len();
    let start = if xml[..start].ends_with('\n') {
        start - 1
    } else {
        start
    };
    Some(format!("{}{}", &xml[..start], &xml[range.end..]))
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
    /// `<domain name>`: the DNS domain of the guests (DHCP option 15).
    pub domain: Option<String>,
    /// `<domain localOnly='yes'>`: names under the domain are never forwarded.
    pub domain_local_only: bool,
    pub dns: DnsDef,
    pub sy_uplink: Option<SyUplink>,
    pub sy_nat: SyNat,
    pub sy_datapath: SyDatapath,
    pub sy_egress: Option<Egress>,
    pub sy_host_loopback: bool,
    pub sy_forwards: Vec<PortForward>,
    pub sy_guard: datapath::guard::GuardConfig,
    /// `<sy:guard leases-per-mac>`: DHCP leases and offers one MAC may hold under different
    /// client identifiers ([`DEFAULT_LEASES_PER_MAC`] when unset, 0 for no cap).
    pub sy_leases_per_mac: u32,
    /// `<sy:port type='tap' target netns mac model/>`: taps attached at every start
    /// (`attach-interface --config`).
    pub sy_ports: Vec<datapath::io::TapSpec>,
    /// `<sy:port type='stream' socket/>`: QEMU stream sockets made at every start.
    pub sy_streams: Vec<String>,
}

/// `<sy:forward proto='tcp' host='127.0.0.1:8080' guest='192.168.122.10:80'/>`.
fn parse_port_forward(node: roxmltree::Node<'_, '_>) -> Result<PortForward, XmlError> {
    let proto = match node.attribute("proto").unwrap_or("tcp") {
        "tcp" => "tcp",
        "udp" => "udp",
        other => {
            return Err(XmlError::BadValue {
                element: "forward".into(),
                attribute: "proto".into(),
                value: other.into(),
                line: line_of(node),
                why: "expected tcp or udp".into(),
            });
        }
    };
    Ok(PortForward {
        proto,
        host: required(node, "host", attr_parse(node, "host")?)?,
        guest: required(node, "guest", attr_parse(node, "guest")?)?,
    })
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
        let sy_child = |name: &str| root.children().find(|c| c.has_tag_name((SY_NS, name)));
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
                let nat = f.children().find(|c| c.has_tag_name("nat"));
                let range =
                    |name: &str| nat.and_then(|n| n.children().find(|c| c.has_tag_name(name)));
                let nat_address = match range("address") {
                    Some(a) => Some((
                        required(a, "start", attr_parse(a, "start")?)?,
                        match attr_parse(a, "end")? {
                            Some(end) => end,
                            None => required(a, "start", attr_parse(a, "start")?)?,
                        },
                    )),
                    None => None,
                };
                let nat_ports = match range("port") {
                    Some(p) => {
                        let start: u16 = required(p, "start", attr_parse(p, "start")?)?;
                        let end: u16 = required(p, "end", attr_parse(p, "end")?)?;
                        if start == 0 || start > end {
                            return Err(XmlError::BadValue {
                                element: "port".into(),
                                attribute: "start".into(),
                                value: format!("{start}-{end}"),
                                line: line_of(p),
                                why: "a port range is 1 <= start <= end".into(),
                            });
                        }
                        Some((start, end))
                    }
                    None => None,
                };
                Some(Forward {
                    mode,
                    dev: f.attribute("dev").map(str::to_string),
                    nat_address,
                    nat_ports,
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
            let dhcp = ip.children().find(|c| c.has_tag_name("dhcp"));
            let mut dhcp_ranges = Vec::new();
            let mut dhcp_hosts = Vec::new();
            for node in dhcp.iter().flat_map(|d| d.children()) {
                if node.has_tag_name("range") {
                    let range = DhcpRange {
                        start: required(node, "start", attr_parse(node, "start")?)?,
                        end: required(node, "end", attr_parse(node, "end")?)?,
                        lease: lease_time(node)?,
                    };
                    if let Some(other) = dhcp_ranges.iter().find(|o: &&DhcpRange| {
                        u32::from(o.start) <= u32::from(range.end)
                            && u32::from(range.start) <= u32::from(o.end)
                    }) {
                        return Err(XmlError::BadValue {
                            element: "range".into(),
                            attribute: "start".into(),
                            value: format!("{}-{}", range.start, range.end),
                            line: line_of(node),
                            why: format!("overlaps the range {}-{}", other.start, other.end),
                        });
                    }
                    dhcp_ranges.push(range);
                } else if node.has_tag_name("host") {
                    dhcp_hosts.push(DhcpHost {
                        mac: required(node, "mac", attr_parse(node, "mac")?)?,
                        name: node.attribute("name").map(str::to_string),
                        ip: attr_parse(node, "ip")?,
                    });
                }
            }
            ips.push(IpDef {
                address,
                prefix,
                dhcp: dhcp.is_some(),
                dhcp_ranges,
                dhcp_hosts,
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
            domain: child("domain")
                .and_then(|d| d.attribute("name"))
                .map(str::to_string),
            domain_local_only: match child("domain") {
                Some(d) => yes_no(d, "localOnly", false)?,
                None => false,
            },
            dns: match child("dns") {
                Some(d) => parse_dns(d)?,
                None => DnsDef::default(),
            },
            sy_uplink: match sy_child("uplink") {
                Some(u) => Some(SyUplink {
                    prefix: match attr_parse::<u8>(u, "prefix")? {
                        Some(p) if p > 32 => {
                            return Err(XmlError::BadValue {
                                element: "uplink".into(),
                                attribute: "prefix".into(),
                                value: p.to_string(),
                                line: line_of(u),
                                why: "an IPv4 prefix is at most 32".into(),
                            });
                        }
                        p => p,
                    },
                    gateway: attr_parse(u, "gateway")?,
                    mac: attr_parse(u, "mac")?,
                    rx: attr_parse(u, "rx")?,
                }),
                None => None,
            },
            sy_streams: root
                .children()
                .filter(|c| {
                    c.has_tag_name((SY_NS, "port")) && c.attribute("type") == Some("stream")
                })
                .map(|p| required(p, "socket", p.attribute("socket").map(str::to_string)))
                .collect::<Result<_, _>>()?,
            sy_ports: root
                .children()
                .filter(|c| {
                    c.has_tag_name((SY_NS, "port")) && c.attribute("type") != Some("stream")
                })
                .map(|p| {
                    if p.attribute("type").is_some_and(|t| t != "tap") {
                        return Err(XmlError::BadValue {
                            element: "port".into(),
                            attribute: "type".into(),
                            value: p.attribute("type").unwrap_or_default().into(),
                            line: line_of(p),
                            why: "only tap ports are defined in the network".into(),
                        });
                    }
                    Ok(datapath::io::TapSpec {
                        name: required(p, "target", p.attribute("target").map(str::to_string))?,
                        netns: p.attribute("netns").map(datapath::io::netns::netns_path),
                        mac: attr_parse(p, "mac")?,
                        mtu: None,
                        clean_traffic: match p.attribute("filter") {
                            None => None,
                            Some("clean-traffic") => Some(true),
                            Some("none") => Some(false),
                            Some(other) => {
                                return Err(XmlError::BadValue {
                                    element: "port".into(),
                                    attribute: "filter".into(),
                                    value: other.into(),
                                    line: line_of(p),
                                    why: "expected 'clean-traffic' or 'none'".into(),
                                });
                            }
                        },
                    })
                })
                .collect::<Result<_, _>>()?,
            sy_egress: match sy_child("egress") {
                Some(e) => Some(required(e, "mode", attr_parse(e, "mode")?)?),
                None => None,
            },
            sy_host_loopback: sy_child("host-loopback").is_some(),
            sy_guard: match sy_child("guard") {
                Some(g) => datapath::guard::GuardConfig {
                    clean_traffic: yes_no(g, "clean-traffic", false)?,
                    dhcp_per_second: attr_parse(g, "dhcp-per-second")?.unwrap_or(0),
                    dns_per_second: attr_parse(g, "dns-per-second")?.unwrap_or(0),
                    broadcast_per_second: attr_parse(g, "broadcast-per-second")?.unwrap_or(0),
                },
                None => datapath::guard::GuardConfig::default(),
            },
            sy_leases_per_mac: match sy_child("guard") {
                Some(g) => attr_parse(g, "leases-per-mac")?.unwrap_or(DEFAULT_LEASES_PER_MAC),
                None => DEFAULT_LEASES_PER_MAC,
            },
            sy_forwards: root
                .children()
                .filter(|c| c.has_tag_name((SY_NS, "forward")))
                .map(parse_port_forward)
                .collect::<Result<_, _>>()?,
            sy_datapath: match sy_child("datapath") {
                Some(n) => parse_sy_datapath(n)?,
                None => SyDatapath::default(),
            },
            sy_nat: match sy_child("nat") {
                Some(n) => SyNat {
                    filtering: attr_parse(n, "filtering")?,
                    max_flows: attr_parse(n, "max-flows")?,
                    max_flows_per_guest: attr_parse(n, "max-flows-per-guest")?,
                },
                None => SyNat::default(),
            },
        })
    }

    /// Whether NATed flows leave through host sockets: `<sy:egress mode='socket'>`, or a
    /// `<forward mode='nat'>` without both a `dev` and an `<nat><address>` of its own (the
    /// default network's case).
    pub fn uses_socket_nat(&self) -> bool {
        let Some(f) = self.forward.as_ref().filter(|f| f.mode == ForwardMode::Nat) else {
            return false;
        };
        match self.sy_egress {
            Some(Egress::Socket) => true,
            Some(Egress::Packet) => false,
            None => f.dev.is_none() || f.nat_address.is_none(),
        }
    }

    /// Socket NAT's settings, when the network uses it (see [`Self::uses_socket_nat`]).
    pub fn socket_nat_setup(&self) -> Option<datapath::socket_nat::SocketNatConfig> {
        if !self.uses_socket_nat() {
            return None;
        }
        let ip = self.ips.first()?;
        let mut config = datapath::socket_nat::SocketNatConfig::new(ip.address, ip.prefix);
        config.mtu = self.mtu.unwrap_or(1500);
        if let Some(ports) = self.forward.as_ref().and_then(|f| f.nat_ports) {
            config.ports = ports;
        }
        if let Some(filtering) = self.sy_nat.filtering {
            config.filtering = filtering;
        }
        if let Some(n) = self.sy_nat.max_flows {
            config.max_flows = n;
        }
        if let Some(n) = self.sy_nat.max_flows_per_guest {
            config.max_flows_per_guest = n;
        }
        config.host_loopback = self.sy_host_loopback;
        Some(config)
    }

    /// Packet NAT's settings, when the network asks for it: `<forward mode='nat' dev=...>`
    /// with one `<nat><address>`. `uplink_mtu` is the MTU of `dev`.
    pub fn nat_setup(
        &self,
        uplink_mtu: u16,
    ) -> Result<Option<(datapath::nat::NatConfig, datapath::uplink::UplinkConfig)>, String> {
        let Some(f) = self
            .forward
            .as_ref()
            .filter(|f| f.mode == ForwardMode::Nat && !self.uses_socket_nat())
        else {
            return Ok(None);
        };
        let (Some(_), Some((start, end)), Some(ip)) = (&f.dev, f.nat_address, self.ips.first())
        else {
            return Ok(None);
        };
        if start != end {
            return Err(format!(
                "<nat><address start='{start}' end='{end}'>: switchyard owns exactly one external \
                 address; give start = end"
            ));
        }
        let sy = self.sy_uplink.clone().unwrap_or_default();
        let mut nat = datapath::nat::NatConfig::new(ip.address, ip.prefix, start);
        if let Some(ports) = f.nat_ports {
            nat.ports = ports;
        }
        if let Some(filtering) = self.sy_nat.filtering {
            nat.filtering = filtering;
        }
        if let Some(n) = self.sy_nat.max_flows {
            nat.max_flows = n;
        }
        if let Some(n) = self.sy_nat.max_flows_per_guest {
            nat.max_flows_per_guest = n;
        }
        let uplink = datapath::uplink::UplinkConfig {
            mac: sy.mac.unwrap_or_else(|| {
                datapath::gateway::GatewayConfig::mac_for_network(&format!("{}/uplink", self.name))
            }),
            ip: start,
            prefix: sy.prefix.unwrap_or(24),
            gateway: sy.gateway,
            mtu: uplink_mtu,
        };
        Ok(Some((nat, uplink)))
    }

    /// The host NIC of bridge mode: `<forward mode='bridge' dev='IF'>`, or libvirt's
    /// `<forward mode='bridge'/>` with `<bridge name='IF'/>` (an existing host bridge).
    pub fn bridge_dev(&self) -> Option<String> {
        let forward = self
            .forward
            .as_ref()
            .filter(|f| f.mode == ForwardMode::Bridge)?;
        forward.dev.clone().or_else(|| self.bridge.clone())
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

    /// The DHCP server's settings, when the first `<ip>` has a `<dhcp>`: its first `<range>`
    /// (with its `<lease>`, default one hour), its `<host>` reservations, `<domain name>`, and
    /// the gateway as router and DNS server, as libvirt's dnsmasq configuration says.
    pub fn dhcp_config(&self) -> Result<Option<dhcp_dns::dhcp::DhcpConfig>, String> {
        let Some(ip) = self.ips.first().filter(|ip| ip.dhcp) else {
            return Ok(None);
        };
        // Only <host> entries: reservations only, no dynamic pool (an empty range).
        let range = ip.dhcp_ranges.first().map_or_else(
            || {
                let after = u32::from(ip.address).saturating_add(1);
                (Ipv4Addr::from(after), ip.address)
            },
            |r| (r.start, r.end),
        );
        let mut config = dhcp_dns::dhcp::DhcpConfig::new(ip.address, ip.prefix, range);
        if let Some(lease) = ip.dhcp_ranges.first().and_then(|r| r.lease) {
            config.lease_time = match lease {
                LeaseTime::Seconds(s) => Some(s),
                LeaseTime::Infinite => None,
            };
        }
        config.domain = self.domain.clone();
        if self.forward.is_none() {
            // An isolated network has no way out: libvirt tells dnsmasq `dhcp-option=3`
            // (no router), so guests keep their default route elsewhere.
            config.router = None;
        }
        config.hosts = ip
            .dhcp_hosts
            .iter()
            .map(|h| dhcp_dns::dhcp::HostReservation {
                mac: h.mac.0,
                name: h.name.clone(),
                ip: h.ip,
            })
            .collect();
        config.leases_per_mac = match self.sy_leases_per_mac {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        // Reservations hold leases too: they must not be refused for lease-max.
        let reserved = config.hosts.iter().filter(|h| h.ip.is_some()).count();
        config.lease_max = if ip.dhcp_ranges.is_empty() {
            reserved
        } else {
            config.lease_max + reserved
        };
        config.validate().map_err(|e| format!("<dhcp>: {e}"))?;
        Ok(Some(config))
    }

    /// The DNS forwarder's settings, unless `<dns enable='no'>` or the network has no
    /// address: local names under `<domain>`, the `<dns>` records, and the forwarders. The
    /// second value says whether the default upstreams come from the host's resolv.conf (no
    /// `<forwarder>` without a domain was given), as libvirt's dnsmasq does.
    pub fn dns_config(&self) -> Option<(dhcp_dns::dns::DnsConfig, bool)> {
        let ip = self.ips.first()?;
        if !self.dns.enable {
            return None;
        }
        let mut config = dhcp_dns::dns::DnsConfig::new();
        config.domain = self.domain.clone();
        config.local_only = self.domain_local_only;
        config.network = Some((ip.address, ip.prefix));
        config.hosts = self.dns.hosts.clone();
        // Every <dhcp><host name ip> has its name, leased or not (dnsmasq's dhcp-host names).
        for host in &ip.dhcp_hosts {
            if let (Some(name), Some(addr)) = (&host.name, host.ip) {
                config.hosts.push((addr, vec![name.clone()]));
            }
        }
        config.txt = self.dns.txt.clone();
        config.srv = self.dns.srv.clone();
        config.forward_plain_names = self.dns.forward_plain_names;
        let at53 = |a: &std::net::IpAddr| std::net::SocketAddr::new(*a, 53);
        for (domain, addr) in &self.dns.forwarders {
            match domain {
                None => config.upstreams.extend(addr.iter().map(at53)),
                Some(domain) => {
                    let servers = addr.iter().map(at53).collect();
                    config.domain_upstreams.push((domain.clone(), servers));
                }
            }
        }
        // An isolated network has no way out: libvirt gives its dnsmasq `no-resolv` (its
        // <forwarder>s still apply).
        let from_resolv_conf = config.upstreams.is_empty() && self.forward.is_some();
        Some((config, from_resolv_conf))
    }

    /// Parts of this definition the engine does not carry out yet, one line each, so `run`
    /// can say so plainly instead of pretending.
    pub fn not_yet_implemented(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if let Some(f) = &self.forward {
            if f.mode == ForwardMode::Nat {
                // Packet NAT and socket NAT are implemented.
            } else if f.mode == ForwardMode::Bridge && self.bridge_dev().is_some() {
                // Bridge mode through a host NIC is implemented.
            } else {
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
        }
        for ip in self.ips.iter().skip(1) {
            missing.push(format!(
                "<ip address='{}'>: only the first <ip> is served",
                ip.address
            ));
        }
        if let Some(ip) = self.ips.first()
            && ip.dhcp_ranges.len() > 1
        {
            missing.push("<dhcp>: only the first <range> is served".into());
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
                dev: None,
                nat_address: None,
                nat_ports: None,
            })
        );
        assert_eq!(
            net.ips,
            vec![IpDef {
                address: Ipv4Addr::new(192, 168, 122, 1),
                prefix: 24,
                dhcp: true,
                dhcp_ranges: vec![DhcpRange {
                    start: Ipv4Addr::new(192, 168, 122, 2),
                    end: Ipv4Addr::new(192, 168, 122, 254),
                    lease: None,
                }],
                dhcp_hosts: vec![],
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
    fn parses_egress_host_loopback_and_port_forwards() {
        let net = NetworkDef::parse(
            "<network xmlns:sy='urn:switchyard:network:1'><name>x</name>\
             <forward mode='nat' dev='eth0'><nat><address start='203.0.113.2' end='203.0.113.2'/>\
             </nat></forward><ip address='10.0.0.1' prefix='24'/>\
             <sy:egress mode='socket'/><sy:host-loopback/>\
             <sy:forward proto='tcp' host='127.0.0.1:8080' guest='10.0.0.10:80'/></network>",
        )
        .unwrap();
        assert!(net.uses_socket_nat(), "sy:egress overrides the address");
        assert!(net.nat_setup(1500).unwrap().is_none());
        assert!(net.socket_nat_setup().unwrap().host_loopback);
        assert_eq!(
            net.sy_forwards,
            vec![PortForward {
                proto: "tcp",
                host: "127.0.0.1:8080".parse().unwrap(),
                guest: "10.0.0.10:80".parse().unwrap(),
            }]
        );
        for (xml, needle) in [
            (
                "<sy:forward proto='sctp' host='127.0.0.1:1' guest='10.0.0.2:1'/>",
                "sctp",
            ),
            ("<sy:forward host='127.0.0.1:1'/>", "guest"),
            ("<sy:egress mode='magic'/>", "magic"),
        ] {
            let doc = format!(
                "<network xmlns:sy='urn:switchyard:network:1'><name>x</name>\
                 <forward mode='nat'/><ip address='10.0.0.1' prefix='24'/>{xml}</network>"
            );
            let err = NetworkDef::parse(&doc).unwrap_err().to_string();
            assert!(err.contains(needle), "{xml}: {err}");
        }
    }

    /// libvirt's dnsmasq configuration for an isolated network (its test data
    /// `isolated-network.conf`): `dhcp-option=3` (no router) and `no-resolv`.
    #[test]
    fn isolated_networks_give_no_router_and_do_not_forward_to_resolv_conf() {
        let isolated = NetworkDef::parse(
            "<network><name>x</name><ip address='10.0.0.1' prefix='24'>\
             <dhcp><range start='10.0.0.2' end='10.0.0.9'/></dhcp></ip></network>",
        )
        .unwrap();
        assert_eq!(isolated.dhcp_config().unwrap().unwrap().router, None);
        assert!(!isolated.dns_config().unwrap().1);
        let nat = NetworkDef::parse(DEFAULT_XML).unwrap();
        assert!(nat.dhcp_config().unwrap().unwrap().router.is_some());
        assert!(nat.dns_config().unwrap().1);
    }

    #[test]
    fn says_what_is_not_implemented_yet() {
        let net = NetworkDef::parse(DEFAULT_XML).unwrap();
        let missing = net.not_yet_implemented();
        // The default network's <forward mode='nat'/> is socket NAT: nothing is missing.
        assert!(missing.is_empty(), "{missing:?}");
        assert!(net.uses_socket_nat());
        let sockets = net.socket_nat_setup().unwrap();
        assert_eq!(sockets.gateway, Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(sockets.ports, (1024, 65535));
        assert!(!sockets.host_loopback);
        // DHCP is served; the default network's <dhcp> is taken as dnsmasq would.
        assert!(!missing.iter().any(|m| m.contains("dhcp")), "{missing:?}");
        let dhcp = net.dhcp_config().unwrap().unwrap();
        assert_eq!(
            dhcp.range,
            (
                Ipv4Addr::new(192, 168, 122, 2),
                Ipv4Addr::new(192, 168, 122, 254)
            )
        );
        assert_eq!((dhcp.lease_time, dhcp.lease_max), (Some(3600), 253));
        assert_eq!(dhcp.router, Some(Ipv4Addr::new(192, 168, 122, 1)));
    }

    #[test]
    fn dhcp_takes_ranges_leases_hosts_and_the_domain() {
        let xml = "<network><name>d</name><domain name='lab'/>
          <ip address='10.0.0.1' prefix='24'><dhcp>
            <range start='10.0.0.10' end='10.0.0.19'><lease expiry='2' unit='hours'/></range>
            <host mac='52:54:00:00:00:09' name='db' ip='10.0.0.5'/>
          </dhcp></ip></network>";
        let dhcp = NetworkDef::parse(xml)
            .unwrap()
            .dhcp_config()
            .unwrap()
            .unwrap();
        assert_eq!(dhcp.lease_time, Some(7200));
        assert_eq!(dhcp.lease_max, 11, "the range and the reservation");
        assert_eq!(dhcp.domain.as_deref(), Some("lab"));
        assert_eq!(dhcp.hosts[0].ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(dhcp.hosts[0].name.as_deref(), Some("db"));
        // libvirt: expiry 0 is a lease that never ends; the unit defaults to minutes.
        let forever = xml.replace("expiry='2' unit='hours'", "expiry='0'");
        let dhcp = NetworkDef::parse(&forever)
            .unwrap()
            .dhcp_config()
            .unwrap()
            .unwrap();
        assert_eq!(dhcp.lease_time, None);
        let minutes = xml.replace("expiry='2' unit='hours'", "expiry='5'");
        let dhcp = NetworkDef::parse(&minutes)
            .unwrap()
            .dhcp_config()
            .unwrap()
            .unwrap();
        assert_eq!(dhcp.lease_time, Some(300));
        // A range outside the network is refused, naming <dhcp>.
        let outside = xml.replace("10.0.0.19", "10.0.1.19");
        let err = NetworkDef::parse(&outside)
            .unwrap()
            .dhcp_config()
            .unwrap_err();
        assert!(err.contains("<dhcp>"), "{err}");
    }

    const PACKET_NAT: &str = "<network xmlns:sy='urn:switchyard:network:1'>
      <name>n</name>
      <forward mode='nat' dev='eth1'>
        <nat><address start='203.0.113.2' end='203.0.113.2'/><port start='2000' end='3000'/></nat>
      </forward>
      <ip address='192.168.122.1' netmask='255.255.255.0'/>
      <sy:uplink prefix='24' gateway='203.0.113.1'/>
      <sy:nat filtering='endpoint-independent' max-flows='100' max-flows-per-guest='10'/>
    </network>";

    /// `<sy:datapath>` sets the network's threads; each attribute it gives wins over the
    /// command line's, the others are the command line's.
    #[test]
    fn sy_datapath_places_the_networks_threads_over_the_command_line() {
        let xml = PACKET_NAT.replace(
            "</network>",
            "<sy:datapath workers='2' cpus='1,0'/></network>",
        );
        let net = NetworkDef::parse(&xml).unwrap();
        assert_eq!(net.sy_datapath.workers, Some(2));
        let base = datapath::io::Placement {
            cpus: vec![0],
            realtime: Some(3),
        };
        assert_eq!(
            net.sy_datapath.placement(&base),
            datapath::io::Placement {
                cpus: vec![1, 0],
                realtime: Some(3),
            }
        );
        let none = NetworkDef::parse(PACKET_NAT).unwrap();
        assert_eq!(none.sy_datapath, SyDatapath::default());
        assert_eq!(none.sy_datapath.placement(&base), base);
        for (attr, why) in [
            ("workers='0'", "1 to 64"),
            ("workers='65'", "1 to 64"),
            ("realtime='0'", "1 to 99"),
            ("realtime='100'", "1 to 99"),
            ("cpus='1-0'", "upwards"),
            ("cpus='x'", "not a CPU number"),
            ("pinned='yes'", "pinned"),
        ] {
            let bad = PACKET_NAT.replace("</network>", &format!("<sy:datapath {attr}/></network>"));
            let err = NetworkDef::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{attr}: {err}");
        }
    }

    #[test]
    fn packet_nat_takes_libvirts_nat_and_the_sy_extensions() {
        let net = NetworkDef::parse(PACKET_NAT).unwrap();
        assert!(net.not_yet_implemented().is_empty());
        let (nat, uplink) = net.nat_setup(1400).unwrap().unwrap();
        assert_eq!(nat.external, Ipv4Addr::new(203, 0, 113, 2));
        assert_eq!(nat.ports, (2000, 3000));
        assert_eq!(nat.filtering, datapath::nat::Filtering::EndpointIndependent);
        assert_eq!((nat.max_flows, nat.max_flows_per_guest), (100, 10));
        assert_eq!(uplink.gateway, Some(Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!((uplink.prefix, uplink.mtu), (24, 1400));
        assert_eq!(
            uplink.mac,
            net.nat_setup(1400).unwrap().unwrap().1.mac,
            "stable"
        );

        assert_eq!(
            net.sy_uplink.as_ref().unwrap().rx,
            None,
            "read unless asked"
        );
        let ring = PACKET_NAT.replace(
            "gateway='203.0.113.1'/>",
            "gateway='203.0.113.1' rx='ring'/>",
        );
        let ring = NetworkDef::parse(&ring).unwrap();
        assert_eq!(ring.sy_uplink.unwrap().rx, Some(UplinkRx::Ring));
        let bad = PACKET_NAT.replace(
            "gateway='203.0.113.1'/>",
            "gateway='203.0.113.1' rx='mmap'/>",
        );
        assert!(NetworkDef::parse(&bad).is_err());

        let two = PACKET_NAT.replace("end='203.0.113.2'", "end='203.0.113.9'");
        let err = NetworkDef::parse(&two)
            .unwrap()
            .nat_setup(1500)
            .unwrap_err();
        assert!(err.contains("exactly one external"), "{err}");
        let bad = PACKET_NAT.replace("filtering='endpoint-independent'", "filtering='cone'");
        assert!(
            NetworkDef::parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("filtering")
        );
        let unknown = PACKET_NAT.replace("<sy:nat ", "<sy:nat bogus='1' ");
        assert!(NetworkDef::parse(&unknown).is_err());
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    fn guard_caps_and_per_port_filters() {
        let net = NetworkDef::parse(DEFAULT_XML).unwrap();
        assert_eq!(net.sy_leases_per_mac, DEFAULT_LEASES_PER_MAC);
        assert_eq!(net.dhcp_config().unwrap().unwrap().leases_per_mac, 8);
        let xml = add_port_xml(
            DEFAULT_XML,
            "vnet0",
            Some("g1"),
            None,
            Some("clean-traffic"),
        );
        let xml = add_port_xml(&xml, "vnet1", None, None, Some("none"));
        let xml = add_port_xml(&xml, "vnet2", None, None, None);
        let xml = xml.replace("</network>", "<sy:guard leases-per-mac='0'/></network>");
        let net = NetworkDef::parse(&xml).unwrap();
        let filters: Vec<_> = net.sy_ports.iter().map(|p| p.clean_traffic).collect();
        assert_eq!(filters, [Some(true), Some(false), None]);
        assert_eq!(
            net.dhcp_config().unwrap().unwrap().leases_per_mac,
            usize::MAX
        );
        let bad = xml.replace("filter='none'", "filter='no-spoofing'");
        assert!(NetworkDef::parse(&bad).is_err());
    }
}
