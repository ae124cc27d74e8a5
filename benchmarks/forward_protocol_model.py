"""A hand model of the Mosaic GPU training forward's barrier protocol (`flash_mgpu.forward`):
its producer warpgroup and two consumer warpgroups as sequences of barrier waits, arrivals, TMA
completions and shared-memory slot writes and reads, explored over every interleaving.

    python benchmarks/forward_protocol_model.py 3    # every plan of up to 3 work items

Why: `FWD_OVERLAP`'s GPU body (V freed a visit after K, the producer's copy order) has no
interpreter run, and a deadlock there shows only as a hung GPU. This checks the protocol, not the
code: it is written by hand from `forward` (session 41) and must be edited with it. It reports a
deadlock, a barrier two phases ahead of a waiter (parity alias), or a read of a K, V or
segment-id slot after its refill. Modes (overlap, M): (0, 2) the default schedule; (1, M)
FWD_OVERLAP=M with each visit's K then V (OVERLAP_K_AHEAD=0); (2, M) FWD_OVERLAP=M with K a
visit ahead of V. Session 41: no failure for any mode, with turns on and off, over 840 plans;
it finds the planted bugs it was checked with (V's slot awaited before K's copy under overlap; a
V copy that does not wait for its slot).
"""
import itertools


SLOTS = 2
ARR = dict(k_bar=1, v_bar=1, sk_bar=1, q_bar=1, sq_bar=1, plan_bar=1,
           k_free=2, v_free=2, item_free=2, sched=2)

def producer(items, overlap):
  yield ('tma', 'plan_bar', 0); yield ('wait', 'plan_bar', 0)
  for m, it in enumerate(items):
    s = m % 2
    if m > 0:
      if m >= 2: yield ('wait', 'item_free', s)
      yield ('tma', 'plan_bar', s); yield ('wait', 'plan_bar', s)
    n_full, n_vis, one, streamed = it['n_full'], it['n_vis'], it['one'], it['streamed']
    for w in range(2):
      yield ('tma', 'q_bar', 2*s+w); yield ('tma', 'sq_bar', 2*s+w)
    fresh = min(max(SLOTS - streamed, 0), n_vis)
    def k_of(i):
      g = streamed + i; slot = g % SLOTS
      if i >= fresh: yield ('wait', 'k_free', slot)
      yield ('use_w', 'k', slot, g)
      yield ('tma', 'k_bar', slot)
    def v_of(i):
      g = streamed + i; slot = g % SLOTS
      if g >= SLOTS: yield ('wait', 'v_free', slot)
      yield ('use_w', 'v', slot, g)
      yield ('tma', 'v_bar', slot)
      if i >= n_full and one == 0:
        yield ('use_w', 'sk', slot, g)
        yield ('tma', 'sk_bar', slot)
    if overlap == 2:  # K a visit ahead of V
      for j in range(n_vis + 1):
        if j < n_vis: yield from k_of(j)
        if j >= 1: yield from v_of(j - 1)
      continue
    for i in range(n_vis):
      g = streamed + i; slot = g % SLOTS
      if i >= fresh:
        yield ('wait', 'k_free', slot)
        if not overlap: yield ('wait', 'v_free', slot)
      yield ('use_w', 'k', slot, g)
      yield ('tma', 'k_bar', slot)
      if overlap and g >= SLOTS: yield ('wait', 'v_free', slot)
      yield ('use_w', 'v', slot, g)
      yield ('tma', 'v_bar', slot)
      if i >= n_full and one == 0:
        yield ('use_w', 'sk', slot, g)
        yield ('tma', 'sk_bar', slot)

def classes(n_full, n_vis, one):
  mid = n_vis if one else n_full
  out = []
  for lo, hi, masked in ((0, n_full, False), (n_full, mid, 'layout'), (mid, n_vis, 'segments')):
    out += [(i, masked) for i in range(lo, hi)]
  return out

def consumer(wg, items, overlap, M, turns, one_each):
  total = sum(it['n_vis'] for it in items)
  def sched():
    if turns:
      yield ('arrive', 'sched', 0); yield ('wait', 'sched', 0)
  yield ('wait', 'plan_bar', 0)
  n_items = len(items)
  if turns and one_each and wg == 1: yield from sched()
  for m, it in enumerate(items):
    s = m % 2
    if m > 0: yield ('wait', 'plan_bar', s)
    n_full, n_vis, one, streamed, in_turns = (it[k] for k in ('n_full', 'n_vis', 'one', 'streamed', 'in_turns'))
    if m > 0 and m + 1 < n_items: yield ('arrive', 'item_free', 1 - s)
    if turns and not one_each:
      if wg == 1 and n_vis > 0 and in_turns == 0: yield from sched()
      if wg == 0 and n_vis == 0 and in_turns != 0: yield from sched()
    yield ('wait', 'q_bar', 2*s+wg); yield ('wait', 'sq_bar', 2*s+wg)
    slot_of = lambda i: (streamed + i) % SLOTS
    def release(bar, i):
      if streamed + i + SLOTS < total: yield ('arrive', bar, slot_of(i))
    if n_vis > 0: yield ('wait', 'k_bar', slot_of(0))
    def softmax_of(i, masked):
      yield ('use_r', 'k', slot_of(i), streamed + i)  # S_i (waited before the release)
      yield from release('k_free', i)
      if masked == 'segments':
        yield ('wait', 'sk_bar', slot_of(i)); yield ('use_r', 'sk', slot_of(i), streamed + i)
    def next_k(i):
      if i + 1 < n_vis: yield ('wait', 'k_bar', slot_of(i + 1))
    for i, masked in classes(n_full, n_vis, one):
      if not overlap:
        yield from sched()
        yield from softmax_of(i, masked)
        if turns: yield ('arrive', 'sched', 0)
        yield ('wait', 'v_bar', slot_of(i))
        if turns: yield ('wait', 'sched', 0)
        yield from next_k(i)
        yield ('use_r', 'v', slot_of(i), streamed + i)
        yield from release('v_free', i)
      elif i == 0:
        yield from sched()
        yield from softmax_of(i, masked)
        yield from next_k(i)
        if M == 2: yield from sched()
      else:
        yield ('wait', 'v_bar', slot_of(i - 1))
        yield from sched()
        yield from softmax_of(i, masked)
        yield from next_k(i)
        if M == 2: yield from sched()
        yield ('use_r', 'v', slot_of(i - 1), streamed + i - 1)
        yield from release('v_free', i - 1)
    if overlap and n_vis > 0:
      yield ('wait', 'v_bar', slot_of(n_vis - 1))
      yield ('use_r', 'v', slot_of(n_vis - 1), streamed + n_vis - 1)
      yield from release('v_free', n_vis - 1)
  if turns:
    if one_each:
      if wg == 0: yield from sched()
    elif wg == 0 and items[-1]['n_vis'] > 0:
      yield from sched()

def explore(items, overlap, M, turns, one_each):
  progs = {'P': list(producer(items, overlap)), 0: list(consumer(0, items, overlap, M, turns, one_each)),
           1: list(consumer(1, items, overlap, M, turns, one_each))}
  names = ['P', 0, 1]
  bars = sorted({(op[1], op[2]) for p in progs.values() for op in p if op[0] in ('wait','arrive','tma')})
  bidx = {b: j for j, b in enumerate(bars)}
  # state: pcs (3), per barrier (done, pend), per (thread, barrier) waits-passed, content per buffer slot
  bufs = sorted({(op[1], op[2]) for p in progs.values() for op in p if op[0] in ('use_w','use_r')})
  cidx = {b: j for j, b in enumerate(bufs)}
  start = ((0,0,0), tuple((0,0) for _ in bars), tuple(0 for _ in range(3*len(bars))), tuple(-1 for _ in bufs))
  seen = {start}; stack = [start]; n = 0
  while stack:
    st = stack.pop(); n += 1
    pcs, bs, ws, cont = st
    any_ready = False; finished = True
    for ti, t in enumerate(names):
      if pcs[ti] >= len(progs[t]): continue
      finished = False
      op = progs[t][pcs[ti]]
      nbs, nws, ncont = list(bs), list(ws), list(cont)
      if op[0] == 'wait':
        j = bidx[(op[1], op[2])]; k = ws[ti*len(bars)+j]; c = bs[j][0]
        if c > k + 1: return ('parity alias', t, op, pcs)
        if c < k + 1: continue
        nws[ti*len(bars)+j] = k + 1
      elif op[0] in ('arrive', 'tma'):
        j = bidx[(op[1], op[2])]; d, p = bs[j]; p += 1
        if p == ARR[op[1]]: d, p = d + 1, 0
        nbs[j] = (d, p)
      elif op[0] == 'use_w':
        ncont[cidx[(op[1], op[2])]] = op[3]
      elif op[0] == 'use_r':
        if cont[cidx[(op[1], op[2])]] != op[3]: return ('stale', t, op, cont[cidx[(op[1], op[2])]])
      any_ready = True
      npcs = list(pcs); npcs[ti] += 1
      ns = (tuple(npcs), tuple(nbs), tuple(nws), tuple(ncont))
      if ns not in seen: seen.add(ns); stack.append(ns)
    if not finished and not any_ready:
      return ('deadlock', {t: progs[t][pcs[i]] for i, t in enumerate(names) if pcs[i] < len(progs[t])})
  return ('ok', n)

def items_of(spec):
  items = []; streamed = 0; prev = 0
  for n_full, n_vis, one in spec:
    items.append(dict(n_full=n_full, n_vis=n_vis, one=one, streamed=streamed, in_turns=int(prev > 0)))
    streamed += n_vis; prev = n_vis
  return items


if __name__ == '__main__':
  import argparse

  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("max_items", type=int, nargs="?", default=3,
                  help="explore every plan of up to this many work items (default 3)")
  maxlen = ap.parse_args().max_items
  if maxlen < 1:
    ap.error(f"max_items={maxlen}: must be >= 1")
  kinds = [(0,0,1),(0,1,0),(1,2,1),(0,3,0)]
  bad = 0; total = 0; states = 0
  for L in range(1, maxlen+1):
    for spec in itertools.product(kinds, repeat=L):
      if sum(x[1] for x in spec) > 7: continue
      for overlap, M in ((0,2),(1,1),(1,2),(2,1),(2,2)):
        for turns in (True, False):
          for one_each in ((False, True) if L == 1 else (False,)):
            r = explore(items_of(spec), overlap, M, turns, one_each); total += 1
            if r[0] != 'ok':
              bad += 1
              if bad < 5: print(spec, overlap, M, turns, one_each, r)
            else: states += r[1]
  print('configs', total, 'bad', bad, 'states', states)
