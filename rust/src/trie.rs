//! A byte trie of a vocabulary: the longest token that is a prefix of a string in one walk over it.
//!
//! The byte-span transfer asks, for every candidate of every row, for the longest target token that
//! begins a byte string. Asking a hash map for each length in turn hashes O(L²) bytes per question and
//! was most of the transfer's time; the trie reads each byte once.

use std::collections::VecDeque;

const NONE: u32 = u32::MAX;

pub struct Trie {
    /// Per node: (first edge, number of edges, id of the key ending here or NONE).
    nodes: Vec<(u32, u32, u32)>,
    /// Each node's edges, contiguous and sorted by byte: (byte, child node).
    edges: Vec<(u8, u32)>,
    /// The root's child for each first byte (NONE where no key starts with it).
    root: Box<[u32; 256]>,
}

impl Trie {
    /// A trie of `entries` (distinct, non-empty byte strings with their ids).
    pub fn new(mut entries: Vec<(Vec<u8>, u32)>) -> Self {
        entries.retain(|(k, _)| !k.is_empty());
        entries.sort_unstable();
        let mut nodes = vec![(0u32, 0u32, NONE)];
        let mut edges: Vec<(u8, u32)> = Vec::new();
        // Breadth first, so that each node's edges are written together: (keys lo..hi sharing the node's
        // prefix of length `depth`, node).
        let mut queue = VecDeque::from([(0usize, entries.len(), 0usize, 0usize)]);
        while let Some((mut lo, hi, depth, node)) = queue.pop_front() {
            if lo < hi && entries[lo].0.len() == depth {
                nodes[node].2 = entries[lo].1; // the key equal to the prefix sorts first
                lo += 1;
            }
            let first = edges.len();
            let mut i = lo;
            while i < hi {
                let b = entries[i].0[depth];
                let j = i + entries[i..hi].partition_point(|(k, _)| k[depth] == b);
                let child = nodes.len();
                nodes.push((0, 0, NONE));
                edges.push((b, child as u32));
                queue.push_back((i, j, depth + 1, child));
                i = j;
            }
            nodes[node].0 = first as u32;
            nodes[node].1 = (edges.len() - first) as u32;
        }
        let mut root = Box::new([NONE; 256]);
        let (first, count, _) = nodes[0];
        for &(b, child) in &edges[first as usize..(first + count) as usize] {
            root[b as usize] = child;
        }
        Trie { nodes, edges, root }
    }

    fn child(&self, node: u32, b: u8) -> Option<u32> {
        let (first, count, _) = self.nodes[node as usize];
        let edges = &self.edges[first as usize..(first + count) as usize];
        if edges.len() <= 8 {
            edges.iter().find(|e| e.0 == b).map(|e| e.1)
        } else {
            edges.binary_search_by_key(&b, |e| e.0).ok().map(|i| edges[i].1)
        }
    }

    /// The id of the longest key that is a prefix of `s` (None when no key is).
    pub fn longest_prefix(&self, s: &[u8]) -> Option<u32> {
        let mut node = *self.root.get(*s.first()? as usize)?;
        if node == NONE {
            return None;
        }
        let mut best = None;
        let mut i = 1;
        loop {
            let id = self.nodes[node as usize].2;
            if id != NONE {
                best = Some(id);
            }
            match s.get(i).and_then(|&b| self.child(node, b)) {
                Some(next) => {
                    node = next;
                    i += 1;
                }
                None => return best,
            }
        }
    }

    /// The id of the key equal to `s`.
    pub fn get(&self, s: &[u8]) -> Option<u32> {
        let (&b0, rest) = s.split_first()?;
        let mut node = self.root[b0 as usize];
        if node == NONE {
            return None;
        }
        for &b in rest {
            node = self.child(node, b)?;
        }
        let id = self.nodes[node as usize].2;
        (id != NONE).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The obvious answer: every length from the longest down, asked of a map.
    fn brute(map: &HashMap<Vec<u8>, u32>, s: &[u8]) -> Option<u32> {
        (1..=s.len()).rev().find_map(|l| map.get(&s[..l]).copied())
    }

    #[test]
    fn longest_prefix_and_get_agree_with_a_map() {
        let keys: [&[u8]; 9] = [b"a", b"ab", b"abc", b"abd", b"b", b"bcd", b"\xe6\x9d\xb1", b"\xe6", b" the"];
        let map: HashMap<Vec<u8>, u32> = keys.iter().enumerate().map(|(i, k)| (k.to_vec(), i as u32 * 3)).collect();
        let trie = Trie::new(map.iter().map(|(k, &v)| (k.clone(), v)).collect());
        // Every string over a small alphabet up to length 4, and some others.
        let alphabet: [u8; 6] = [b'a', b'b', b'c', b'd', 0xe6, 0x9d];
        let mut strings: Vec<Vec<u8>> = vec![Vec::new(), b" the cat".to_vec(), b" th".to_vec(), b"\xe6\x9d\xb1x".to_vec()];
        for len in 1..=4u32 {
            for code in 0..6usize.pow(len) {
                strings.push((0..len).map(|p| alphabet[code / 6usize.pow(p) % 6]).collect());
            }
        }
        for s in &strings {
            assert_eq!(trie.longest_prefix(s), brute(&map, s), "{s:?}");
            assert_eq!(trie.get(s), map.get(s).copied(), "{s:?}");
        }
    }

    #[test]
    fn many_children_use_the_sorted_search() {
        let map: HashMap<Vec<u8>, u32> = (0..=255u8).map(|b| (vec![b'x', b], u32::from(b))).collect();
        let trie = Trie::new(map.iter().map(|(k, &v)| (k.clone(), v)).collect());
        for b in 0..=255u8 {
            assert_eq!(trie.longest_prefix(&[b'x', b, b'y']), Some(u32::from(b)));
        }
        assert_eq!(trie.longest_prefix(b"x"), None);
        assert_eq!(trie.longest_prefix(b""), None);
    }
}
