//! ferry's data plane: ports, workers and forwarding tables. Not written yet: see the README's
//! status section.
