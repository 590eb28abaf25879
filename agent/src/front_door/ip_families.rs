//! A farm's machines advertise addresses of one IP family. A front door knows which machine a
//! relayed connection comes from by the connection's address, and a relay leaves from the
//! sender's advertised address only towards a target of the same family: from a machine
//! advertising IPv4 to one reached over IPv6 (or the other way) it arrives from an address no
//! machine of the farm advertises, and is refused. The front door says so once per such
//! machine, when it reads the farm's list, rather than leave the operator with refusals only.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;

use super::machines::KnownMachine;

/// The machines already warned about.
#[derive(Debug, Default)]
pub struct FamilyWarnings {
    warned: Mutex<HashSet<String>>,
}

impl FamilyWarnings {
    /// Warns about each machine of `machines` with a front door whose addresses share no IP
    /// family with `this_machine`'s (an id), once per machine.
    pub fn check(&self, machines: &[KnownMachine], this_machine: &str) {
        for (this, other) in other_families(machines, this_machine) {
            let first_time = self
                .warned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(other.id.clone());
            if first_time {
                tracing::warn!(
                    machine = %other.name,
                    its_address = %other.address,
                    this_address = %this.address,
                    "this machine and another machine of the farm advertise addresses of different IP families: \
                     clients relayed between their front doors are refused (a farm's machines advertise \
                     addresses of one family)"
                );
            }
        }
    }
}

/// This machine, and each other machine with a front door whose addresses are all of another
/// IP family than this one's (nothing when this machine has no front door or no address known).
fn other_families<'a>(
    machines: &'a [KnownMachine],
    this_machine: &str,
) -> Vec<(&'a KnownMachine, &'a KnownMachine)> {
    let Some(this) = machines
        .iter()
        .find(|machine| machine.id == this_machine && machine.front_door)
    else {
        return Vec::new();
    };
    let shares_a_family = |ips: &[IpAddr]| {
        ips.iter()
            .any(|ip| this.ips.iter().any(|own| own.is_ipv4() == ip.is_ipv4()))
    };
    if this.ips.is_empty() {
        return Vec::new();
    }
    machines
        .iter()
        .filter(|other| {
            other.id != this_machine
                && other.front_door
                && !other.ips.is_empty()
                && !shares_a_family(&other.ips)
        })
        .map(|other| (this, other))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, ips: &[&str], front_door: bool) -> KnownMachine {
        KnownMachine {
            id: id.into(),
            name: format!("ts-{id}"),
            address: format!("{}:3389", ips.first().unwrap_or(&"host")),
            ready: true,
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            port: 3389,
            front_door,
        }
    }

    fn named(found: Vec<(&KnownMachine, &KnownMachine)>) -> Vec<String> {
        found
            .into_iter()
            .map(|(_, other)| other.id.clone())
            .collect()
    }

    #[test]
    fn machines_of_another_family_only_are_found() {
        let machines = [
            machine("me", &["10.0.0.1"], true),
            machine("v4", &["10.0.0.2"], true),
            machine("v6", &["2001:db8::3"], true),
            machine("both", &["10.0.0.4", "2001:db8::4"], true),
            machine("v6-no-door", &["2001:db8::5"], false),
            machine("unresolved", &[], true),
        ];
        assert_eq!(named(other_families(&machines, "me")), ["v6"]);
        // Seen from the IPv6 machine: every IPv4-only one with a front door.
        assert_eq!(named(other_families(&machines, "v6")), ["me", "v4"]);
        // A machine without a front door relays nothing.
        assert!(other_families(&machines, "v6-no-door").is_empty());
        assert!(other_families(&machines, "unknown").is_empty());
    }
}
