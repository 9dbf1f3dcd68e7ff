#include "tests/fuzz/plan_fixture.hpp"

#include <algorithm>
#include <string>

#include "tests/fuzz/fuzz_support.hpp"

namespace kvflow::fuzz {
namespace {

// One rank's engine memory: an arena per kind, its buffers one after another (layer-major, K
// before V), and the rank_memory over them.
void make_memory(engine_memory& e, const config::routing_plan& plan, bool prefill, int rank, int pages,
                 int state_pages, int aux_rows, const std::vector<std::uint64_t>& aux_row_bytes) {
  const auto& c = plan.config();
  const bool mla = c.model.kind == config::model_kind::mla;
  const int bpl = plan.buffers_per_layer();
  const config::range layers = prefill ? plan.prefill(rank).layers : plan.decode(rank).layers;
  const auto item = static_cast<std::uint64_t>(prefill ? plan.prefill_item_bytes() : plan.decode_item_bytes());
  const auto state_item = mla ? std::uint64_t(c.page_size) * std::uint64_t(c.model.state_bytes_per_token) : 0;
  const auto nl = static_cast<std::uint64_t>(layers.size());
  const std::uint64_t per = std::uint64_t(pages) * item, sper = std::uint64_t(state_pages) * state_item;
  e.kv.assign(nl * std::uint64_t(bpl) * per, std::byte{0});
  e.state.assign(nl * sper, std::byte{0});
  std::uint64_t aux_total = 0;
  for (auto r : aux_row_bytes) aux_total += r * std::uint64_t(aux_rows);
  e.aux.assign(aux_total, std::byte{0});
  for (int l = layers.begin; l < layers.end; ++l)
    for (int b = 0; b < bpl; ++b) {
      auto* base = e.kv.data() + (std::uint64_t(l - layers.begin) * std::uint64_t(bpl) + std::uint64_t(b)) * per;
      e.specs.push_back({{base, per, item}, mla ? buffer_kind::latent : (b == 0 ? buffer_kind::k : buffer_kind::v), l});
    }
  if (sper > 0)
    for (int l = layers.begin; l < layers.end; ++l)
      e.specs.push_back(
          {{e.state.data() + std::uint64_t(l - layers.begin) * sper, sper, state_item}, buffer_kind::state, l});
  std::uint64_t off = 0;
  for (auto r : aux_row_bytes) {
    e.specs.push_back({{e.aux.data() + off, r * std::uint64_t(aux_rows), r}, buffer_kind::aux, -1});
    off += r * std::uint64_t(aux_rows);
  }
  auto m = rank_memory::create(plan, prefill, rank, layers, e.specs);
  if (!m) fail("fixture memory: " + m.error().reason());
  e.mem = m.value();
}

// The registration of the decode rank: every buffer and the receipts registered on their own,
// each a region of its own (decode_rank.cpp's register_memory without transport allocations).
void register_decode(plan_fixture& f) {
  const auto owner = static_cast<std::uint64_t>(f.decode_rank);
  auto reg = [&](const buffer_view& b) {
    auto d = f.transport->register_memory(owner, b.base, b.bytes);
    if (!d) fail("fixture registration: " + d.error().reason());
    f.regions.push_back(d.value());
    return remote_buffer{d->id, 0, b.bytes, b.page_bytes};
  };
  const auto& mem = f.dst.mem;
  f.pool = describe_shape(mem);
  for (const auto& b : mem.kv_buffers()) f.pool.kv.push_back(reg(b));
  for (const auto& b : mem.aux_buffers()) f.pool.aux.push_back(reg(b));
  for (const auto& b : mem.state_buffers()) f.pool.state.push_back(reg(b));
  f.receipts.assign(static_cast<std::size_t>(std::max(1, mem.aux_rows())), aux_record{});
  f.pool.receipts = reg({reinterpret_cast<std::byte*>(f.receipts.data()), f.receipts.size() * sizeof(aux_record),
                         sizeof(aux_record)});
  if (auto s = check_remote_pool(f.pool); !s) fail("fixture registration: " + s.reason());
}

std::unique_ptr<plan_fixture> make_fixture(const config::cluster_config& c, config::prefill_coord sender,
                                           int src_pages, int dst_pages) {
  auto f = std::make_unique<plan_fixture>();
  f->plan = std::make_shared<const config::routing_plan>(c);
  f->mla = c.model.kind == config::model_kind::mla;
  f->prefill_rank = config::prefill_rank_of(c.prefill, sender);
  f->decode_rank = 0;
  bool found = false;
  for (const auto& pe : f->plan->decode(f->decode_rank).peers)
    if (pe.pp == sender.pp && pe.cp == sender.cp && pe.tp == sender.tp) {
      f->read = pe;
      found = true;
    }
  if (!found) fail("fixture: the decode rank does not read the sender");
  make_memory(f->src, *f->plan, true, f->prefill_rank, src_pages, f->mla ? src_pages : 0, 4, {64, 16});
  make_memory(f->dst, *f->plan, false, f->decode_rank, dst_pages, f->mla ? dst_pages : 0, 8, {64, 16});
  f->fabric = std::make_shared<transport::inproc_fabric>();
  f->transport = std::make_shared<transport::inproc_transport>(f->fabric);
  register_decode(*f);
  return f;
}

bool inside(const std::byte* p, std::uint64_t len, const std::vector<std::byte>& arena) {
  const auto* b = arena.data();
  return p >= b && static_cast<std::uint64_t>(p - b) <= arena.size() && len <= arena.size() - std::uint64_t(p - b);
}

bool lands_in(const transport::block& blk, const remote_buffer& d) {
  return blk.region == d.region && blk.offset >= d.offset && blk.offset - d.offset <= d.bytes &&
         blk.len <= d.bytes - (blk.offset - d.offset);
}

}  // namespace

const plan_fixture& mla_fixture() {
  // DSv3.2-like MLA with state, scaled down: 4 layers, 40 B of latent and 8 B of state per
  // token, 4 tokens per page; prefill PP 2 x CP 2 sending CP shares; the sender is the CP 0
  // rank of the last stage (it writes the aux rows).
  static const auto f = [] {
    config::cluster_config c;
    c.model.kind = config::model_kind::mla;
    c.model.name = "mla:4:40:8";
    c.model.layers = 4;
    c.model.mla_bytes_per_token = 40;
    c.model.state_bytes_per_token = 8;
    c.page_size = 4;
    c.prefill.pp = 2;
    c.prefill.cp = 2;
    c.cp_send_all = true;
    return make_fixture(c, {0, 1, 0, 0}, 16, 32);
  }();
  return *f;
}

const plan_fixture& mha_fixture() {
  // MHA, 3 layers of 4 KV heads of 6 B per token, 4 tokens per page: the decode rank (TP 1)
  // holds all 4 heads, the sender (prefill TP 1 of 2) the upper 2.
  static const auto f = [] {
    config::cluster_config c;
    c.model.kind = config::model_kind::mha;
    c.model.name = "mha:3:4:3";
    c.model.layers = 3;
    c.model.kv_heads = 4;
    c.model.head_dim = 3;
    c.model.elem_size = 2;
    c.model.state_bytes_per_token = 0;
    c.dtype = config::kv_dtype::bf16;
    c.page_size = 4;
    c.prefill.tp = 2;
    return make_fixture(c, {0, 0, 0, 1}, 8, 16);
  }();
  return *f;
}

config::range layers_to(const plan_fixture& f, const remote_pool& pool) {
  const auto mine = f.src.mem.layers();
  const std::int64_t end = std::int64_t{pool.layer_begin} + pool.layer_count;
  return {std::max(mine.begin, pool.layer_begin), static_cast<int>(std::min<std::int64_t>(mine.end, end))};
}

void check_blocks(const plan_fixture& f, const remote_pool& pool, const std::vector<transport::block>& blocks,
                  const aux_record* receipt) {
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const auto& b = blocks[i];
    const auto* r = reinterpret_cast<const std::byte*>(receipt);
    const bool reads_ok = inside(b.src, b.len, f.src.kv) || inside(b.src, b.len, f.src.state) ||
                          inside(b.src, b.len, f.src.aux) || (b.src == r && b.len == sizeof(aux_record));
    if (!reads_ok) fail("block " + std::to_string(i) + " reads outside the sender's memory");
    bool writes_ok = lands_in(b, pool.receipts);
    for (const auto* list : {&pool.kv, &pool.state, &pool.aux})
      for (const auto& d : *list) writes_ok = writes_ok || lands_in(b, d);
    if (!writes_ok)
      fail("block " + std::to_string(i) + " [" + std::to_string(b.offset) + ", +" + std::to_string(b.len) +
           ") of region " + std::to_string(b.region) + " is outside every buffer the registration describes");
  }
}

status push(const plan_fixture& f, const std::vector<transport::block>& blocks) {
  status out = status::error("the push did not complete");
  f.transport->push(static_cast<std::uint64_t>(f.decode_rank), blocks, [&](status s) { out = std::move(s); });
  return out;  // the in-process transport completes inside push()
}

}  // namespace kvflow::fuzz
