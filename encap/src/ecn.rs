//! ECN across the tunnel, as RFC 6040 says (hot path).
//!
//! On encapsulation the outer header gets a copy of the inner ECN field (normal mode) or Not-ECT
//! (compatibility mode, for decapsulators that predate RFC 6040). On decapsulation the inner field is
//! combined with the outer one by RFC 6040's Figure 4, so a CE mark set by the underlay reaches the
//! receiver, and a CE mark over a Not-ECT inner packet causes a drop.

use crate::DropReason;

/// Not ECN-capable transport.
pub const NOT_ECT: u8 = 0b00;
/// ECN-capable transport (1).
pub const ECT1: u8 = 0b01;
/// ECN-capable transport (0).
pub const ECT0: u8 = 0b10;
/// Congestion experienced.
pub const CE: u8 = 0b11;

/// How the encapsulator sets the outer ECN field (RFC 6040 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EcnMode {
    /// Copy the inner ECN field to the outer header.
    #[default]
    Normal,
    /// Outer header always Not-ECT.
    Compatibility,
}

/// The outer ECN field for an inner ECN field.
#[inline]
pub const fn encap(mode: EcnMode, inner: u8) -> u8 {
    match mode {
        EcnMode::Normal => inner & 0b11,
        EcnMode::Compatibility => NOT_ECT,
    }
}

/// The inner ECN field after decapsulation (RFC 6040 Figure 4).
///
/// # Errors
/// [`DropReason::EcnCeOnNotEct`] for an outer CE over an inner Not-ECT.
#[inline]
pub const fn decap(inner: u8, outer: u8) -> Result<u8, DropReason> {
    match (inner & 0b11, outer & 0b11) {
        (NOT_ECT, CE) => Err(DropReason::EcnCeOnNotEct),
        (NOT_ECT, _) => Ok(NOT_ECT),
        (_, CE) => Ok(CE),
        (ECT0, ECT1) => Ok(ECT1),
        (i, _) => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6040_figure_4() {
        // Rows: inner Not-ECT, ECT(0), ECT(1), CE; columns: outer Not-ECT, ECT(0), ECT(1), CE.
        let table: [[Result<u8, DropReason>; 4]; 4] = [
            [Ok(NOT_ECT), Ok(NOT_ECT), Ok(NOT_ECT), Err(DropReason::EcnCeOnNotEct)],
            [Ok(ECT0), Ok(ECT0), Ok(ECT1), Ok(CE)],
            [Ok(ECT1), Ok(ECT1), Ok(ECT1), Ok(CE)],
            [Ok(CE), Ok(CE), Ok(CE), Ok(CE)],
        ];
        let order = [NOT_ECT, ECT0, ECT1, CE];
        for (r, inner) in order.iter().enumerate() {
            for (c, outer) in order.iter().enumerate() {
                assert_eq!(decap(*inner, *outer), table[r][c], "inner {inner:02b} outer {outer:02b}");
            }
        }
    }

    #[test]
    fn encap_modes() {
        assert_eq!(encap(EcnMode::Normal, CE), CE);
        assert_eq!(encap(EcnMode::Normal, ECT1), ECT1);
        assert_eq!(encap(EcnMode::Compatibility, CE), NOT_ECT);
    }
}
