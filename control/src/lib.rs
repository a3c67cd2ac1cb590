//! ferry's control plane: sources, diffing and publication. Not written yet: see the README's
//! status section.
