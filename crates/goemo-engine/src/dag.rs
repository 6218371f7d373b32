//! The stage graph and its algorithms ([`Graph`], [`topo_order`]; each linear in stages +
//! edges). `goemo dag`'s drawings of it are in [`crate::render`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Stages `0..n` and their dep edges, both ways. Indices are positions in a topological order
/// (every upstream has a smaller index than its downstream) once the pipeline is loaded.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Direct upstreams of each stage, sorted, without repeats.
    ups: Vec<Vec<usize>>,
    /// Direct downstreams of each stage, sorted, without repeats.
    downs: Vec<Vec<usize>>,
}

impl Graph {
    /// From each stage's direct upstreams (in any order, repeats allowed).
    pub fn new(mut ups: Vec<Vec<usize>>) -> Self {
        let mut downs = vec![Vec::new(); ups.len()];
        for (i, list) in ups.iter_mut().enumerate() {
            list.sort_unstable();
            list.dedup();
            for &u in list.iter() {
                downs[u].push(i);
            }
        }
        // Pushed in increasing `i`, so each list is already sorted and without repeats.
        Graph { ups, downs }
    }

    pub fn len(&self) -> usize {
        self.ups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ups.is_empty()
    }

    pub fn upstream(&self, i: usize) -> &[usize] {
        &self.ups[i]
    }

    pub fn downstream(&self, i: usize) -> &[usize] {
        &self.downs[i]
    }

    /// The `roots` and every stage they depend on, directly or not.
    pub fn ancestors(&self, roots: impl IntoIterator<Item = usize>) -> Vec<bool> {
        walk(&self.ups, roots)
    }

    /// The `roots` and every stage that depends on them, directly or not.
    pub fn descendants(&self, roots: impl IntoIterator<Item = usize>) -> Vec<bool> {
        walk(&self.downs, roots)
    }

    /// Layer of each stage: 0 for stages without deps, else 1 + the deepest upstream. Needs
    /// the indices in topological order (as a loaded pipeline's are).
    pub fn layers(&self) -> Vec<usize> {
        let mut layer = vec![0usize; self.len()];
        for i in 0..self.len() {
            layer[i] = self.ups[i].iter().map(|&u| layer[u] + 1).max().unwrap_or(0);
        }
        layer
    }
}

/// Every node reachable from `roots` along `edges`, roots included: an iterative depth-first
/// walk, each node and edge visited once.
fn walk(edges: &[Vec<usize>], roots: impl IntoIterator<Item = usize>) -> Vec<bool> {
    let mut seen = vec![false; edges.len()];
    let mut stack: Vec<usize> = Vec::new();
    for r in roots {
        if !seen[r] {
            seen[r] = true;
            stack.push(r);
        }
        while let Some(i) = stack.pop() {
            for &next in &edges[i] {
                if !seen[next] {
                    seen[next] = true;
                    stack.push(next);
                }
            }
        }
    }
    seen
}

/// Kahn's algorithm over each node's direct upstreams (repeats allowed), ties broken by the
/// smaller index (declaration order). On a cycle, returns one: its nodes in data-flow order
/// starting at the smallest index, with that index repeated at the end.
pub fn topo_order(ups: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = ups.len();
    let mut downs: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, list) in ups.iter().enumerate() {
        for &u in list {
            downs[u].push(i);
        }
    }
    let mut indegree: Vec<usize> = ups.iter().map(Vec::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    let mut done = vec![false; n];
    while let Some(Reverse(next)) = ready.pop() {
        done[next] = true;
        order.push(next);
        for &d in &downs[next] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    Err(find_cycle(ups, &done))
}

/// A cycle among the nodes not `done`, each of which has an upstream that is not done: walk
/// upstream from the first one until a node repeats.
fn find_cycle(ups: &[Vec<usize>], done: &[bool]) -> Vec<usize> {
    let mut on_path: Vec<Option<usize>> = vec![None; ups.len()];
    let Some(start) = done.iter().position(|d| !d) else {
        return Vec::new();
    };
    let mut path = vec![start];
    on_path[start] = Some(0);
    loop {
        let cur = path[path.len() - 1];
        let Some(up) = ups[cur].iter().copied().find(|&u| !done[u]) else {
            return Vec::new(); // not reached: a node left by Kahn has an upstream left too
        };
        if let Some(pos) = on_path[up] {
            // In data-flow order, starting at the smallest index.
            let mut cycle: Vec<usize> = path[pos..].iter().rev().copied().collect();
            let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
            cycle.rotate_left(first);
            cycle.push(cycle[0]);
            return cycle;
        }
        on_path[up] = Some(path.len());
        path.push(up);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topo_order_breaks_ties_by_declaration_and_names_a_cycle() {
        // 0 ← 2, 1 ← 0: order 0, 1, 2 would be wrong; 2 has no deps.
        assert_eq!(topo_order(&[vec![2], vec![0], vec![]]), Ok(vec![2, 0, 1]));
        assert_eq!(topo_order(&[vec![], vec![], vec![0, 0]]), Ok(vec![0, 1, 2]));
        // 0 → 1 → 2 → 0, and 3 downstream of the cycle.
        assert_eq!(
            topo_order(&[vec![2], vec![0], vec![1], vec![2]]),
            Err(vec![0, 1, 2, 0])
        );
        assert_eq!(topo_order(&[vec![0]]), Err(vec![0, 0]));
    }

    #[test]
    fn ancestors_and_descendants_of_a_long_chain_are_linear() {
        let n = 100_000;
        let ups: Vec<Vec<usize>> = (0..n)
            .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
            .collect();
        let order = topo_order(&ups).unwrap();
        assert_eq!(order.len(), n);
        let g = Graph::new(ups);
        let anc = g.ancestors([n / 2]);
        assert_eq!(anc.iter().filter(|&&a| a).count(), n / 2 + 1);
        let desc = g.descendants([n / 2]);
        assert_eq!(desc.iter().filter(|&&d| d).count(), n - n / 2);
        assert_eq!(g.layers()[n - 1], n - 1);
        assert_eq!(g.downstream(0), &[1]);
    }
}
