//! A byte-wise compressed prefix (radix) tree that answers "which stored keys
//! are prefixes of this path", longest first, walking the path once and
//! without allocating.

const NONE: u32 = u32::MAX;

/// Above this many children, a node's child lookup uses binary search.
const LINEAR_CHILDREN: usize = 16;

#[derive(Debug)]
struct Node {
    /// Edge label from the parent (empty for the root).
    label: Box<[u8]>,
    /// First byte of each child's label, sorted ascending.
    child_bytes: Box<[u8]>,
    /// Child node indices, parallel to `child_bytes`.
    child_nodes: Box<[u32]>,
    /// Value stored for the key ending at this node, or `NONE`.
    value: u32,
    /// Length of the key ending at this node.
    depth: u32,
    /// Nearest proper ancestor that holds a value, or `NONE`.
    up: u32,
}

impl Node {
    #[inline]
    fn child(&self, byte: u8) -> Option<u32> {
        let i = if self.child_bytes.len() <= LINEAR_CHILDREN {
            self.child_bytes.iter().position(|&b| b == byte)?
        } else {
            self.child_bytes.binary_search(&byte).ok()?
        };
        Some(self.child_nodes[i])
    }
}

/// Immutable prefix tree mapping byte-string keys to `u32` values.
#[derive(Debug)]
pub(crate) struct PrefixTree {
    /// `nodes[0]` is the root.
    nodes: Box<[Node]>,
}

#[derive(Debug, Default)]
struct BuildNode {
    label: Vec<u8>,
    children: Vec<(u8, u32)>,
    value: Option<u32>,
}

impl PrefixTree {
    /// Builds a tree from `(key, value)` pairs; keys must be distinct.
    pub(crate) fn build<'a>(entries: impl IntoIterator<Item = (&'a [u8], u32)>) -> PrefixTree {
        let mut nodes = vec![BuildNode::default()];
        for (key, value) in entries {
            assert!(value != NONE, "prefix tree value out of range");
            insert(&mut nodes, key, value);
        }
        freeze(nodes)
    }

    /// Iterates over the values whose keys are prefixes of `path`, longest
    /// key first, yielding `(value, key_len)`.
    #[inline]
    pub(crate) fn prefixes_of(&self, path: &[u8]) -> Prefixes<'_> {
        let nodes = &self.nodes[..];
        let mut n = 0usize;
        let mut i = 0usize;
        let mut best = NONE;
        loop {
            let node = &nodes[n];
            if node.value != NONE {
                best = n as u32;
            }
            if i == path.len() {
                break;
            }
            let Some(c) = node.child(path[i]) else { break };
            let label = &nodes[c as usize].label;
            if !path[i..].starts_with(label) {
                break;
            }
            i += label.len();
            n = c as usize;
        }
        Prefixes { nodes, cur: best }
    }
}

/// Iterator returned by [`PrefixTree::prefixes_of`].
pub(crate) struct Prefixes<'t> {
    nodes: &'t [Node],
    cur: u32,
}

impl Iterator for Prefixes<'_> {
    type Item = (u32, usize);

    #[inline]
    fn next(&mut self) -> Option<(u32, usize)> {
        if self.cur == NONE {
            return None;
        }
        let node = &self.nodes[self.cur as usize];
        self.cur = node.up;
        Some((node.value, node.depth as usize))
    }
}

fn insert(nodes: &mut Vec<BuildNode>, key: &[u8], value: u32) {
    let mut n = 0usize;
    let mut rest = key;
    loop {
        if rest.is_empty() {
            assert!(nodes[n].value.is_none(), "duplicate prefix tree key");
            nodes[n].value = Some(value);
            return;
        }
        let first = rest[0];
        let Some(&(_, c)) = nodes[n].children.iter().find(|(b, _)| *b == first) else {
            let leaf = nodes.len() as u32;
            nodes.push(BuildNode {
                label: rest.to_vec(),
                children: Vec::new(),
                value: Some(value),
            });
            nodes[n].children.push((first, leaf));
            return;
        };
        let c = c as usize;
        let common = nodes[c]
            .label
            .iter()
            .zip(rest)
            .take_while(|(a, b)| a == b)
            .count();
        if common < nodes[c].label.len() {
            // Split `c`: it keeps the common part, a new node takes the rest
            // of its label together with its children and value.
            let lower = BuildNode {
                label: nodes[c].label[common..].to_vec(),
                children: std::mem::take(&mut nodes[c].children),
                value: nodes[c].value.take(),
            };
            let lower_first = lower.label[0];
            let lower_idx = nodes.len() as u32;
            nodes.push(lower);
            nodes[c].label.truncate(common);
            nodes[c].children.push((lower_first, lower_idx));
        }
        n = c;
        rest = &rest[common..];
    }
}

fn freeze(build: Vec<BuildNode>) -> PrefixTree {
    assert!(build.len() < NONE as usize, "prefix tree too large");
    let mut depth = vec![0u32; build.len()];
    let mut up = vec![NONE; build.len()];
    // Parents are not necessarily created before children (splits append),
    // so propagate depth/up with an explicit DFS from the root.
    let mut stack = vec![0usize];
    while let Some(n) = stack.pop() {
        let nearest = if build[n].value.is_some() {
            n as u32
        } else {
            up[n]
        };
        for &(_, c) in &build[n].children {
            let c = c as usize;
            depth[c] = depth[n] + build[c].label.len() as u32;
            up[c] = nearest;
            stack.push(c);
        }
    }
    let nodes = build
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
            b.children.sort_unstable_by_key(|&(byte, _)| byte);
            Node {
                label: b.label.into_boxed_slice(),
                child_bytes: b.children.iter().map(|&(byte, _)| byte).collect(),
                child_nodes: b.children.iter().map(|&(_, c)| c).collect(),
                value: b.value.unwrap_or(NONE),
                depth: depth[i],
                up: up[i],
            }
        })
        .collect();
    PrefixTree { nodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(keys: &[&str]) -> PrefixTree {
        PrefixTree::build(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.as_bytes(), i as u32)),
        )
    }

    fn hits(t: &PrefixTree, path: &str) -> Vec<(u32, usize)> {
        t.prefixes_of(path.as_bytes()).collect()
    }

    #[test]
    fn longest_first() {
        let t = tree(&["/", "/hello", "/hello/", "/help", "/hello/world/", "/x"]);
        assert_eq!(
            hits(&t, "/hello/world/a"),
            vec![(4, 13), (2, 7), (1, 6), (0, 1)]
        );
        assert_eq!(hits(&t, "/hello/worl"), vec![(2, 7), (1, 6), (0, 1)]);
        assert_eq!(hits(&t, "/hellx"), vec![(0, 1)]);
        assert_eq!(hits(&t, "/help"), vec![(3, 5), (0, 1)]);
        assert_eq!(hits(&t, "/hel"), vec![(0, 1)]);
        assert_eq!(hits(&t, ""), vec![]);
        assert_eq!(hits(&t, "x"), vec![]);
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let t = tree(&["/hello/world/", "/hello/", "/", "/hello", "/help"]);
        assert_eq!(
            hits(&t, "/hello/world/a"),
            vec![(0, 13), (1, 7), (3, 6), (2, 1)]
        );
        assert_eq!(hits(&t, "/help/me"), vec![(4, 5), (2, 1)]);
    }

    #[test]
    fn many_children_binary_search() {
        let keys: Vec<String> = (0u8..200).map(|b| format!("/{}", b as char)).collect();
        let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        let t = tree(&refs);
        for (i, k) in keys.iter().enumerate() {
            let path = format!("{k}/tail");
            assert_eq!(hits(&t, &path), vec![(i as u32, k.len())], "{k:?}");
        }
    }
}
