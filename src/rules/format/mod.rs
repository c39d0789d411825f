//! The spellings of rules: the two rules file formats read into the check
//! layer (`yaml`, with its position tree in `yaml_tree` and its nesting
//! pre-scan in `yaml_scan`; `ini`, QEMU's
//! injector configuration), and the listing `GET /rules` shows (`doc`).

pub mod doc;
pub mod ini;
pub mod yaml;
mod yaml_scan;
mod yaml_tree;
