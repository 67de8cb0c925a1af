# Import paths moved by the layering (issue 26): sed -i -f tools/layering_renames.sed FILES rewrites old ones.
# Names that moved between modules are listed in docs/architecture.md ("What moved").
s/attnkit\.ops\.exact\.api\b/attnkit.functional.exact/g
s/attnkit\.ops\.linear\.api\b/attnkit.functional.linear/g
s/attnkit\.ops\.neighborhood\.api\b/attnkit.functional.neighborhood/g
s/attnkit\.ops\.longctx\.star\b/attnkit.functional.star/g
s/attnkit\.ops\.approx\.mechanisms_retrieval\b/attnkit.records.approx_retrieval/g
s/attnkit\.ops\.\(exact\|neighborhood\|linear\|approx\|longctx\|mixers\)\.mechanisms\b/attnkit.records.\1/g
s/attnkit\.ops\.longctx\.cli\b/attnkit.kvpolicy.cli/g
s/attnkit\.ops\.longctx\.judge\b/attnkit.kvpolicy.judge/g
s/attnkit\.ops\.longctx\.models\b/attnkit.nn.longctx/g
s/attnkit\.ops\.linear\.variants\b/attnkit.nn.linear_variants/g
s/attnkit\.ops\.linear\.cottention\b/attnkit.nn.linear_cottention/g
s/attnkit\.nn\.rotary\b/attnkit.rotary/g
s/attnkit\.analysis\.recording\b/attnkit.nn.recording/g
s/attnkit\.ops\.neighborhood\.pattern\b/attnkit.patterns.spatial/g
s/attnkit\.ops\.neighborhood\.windows\b/attnkit.patterns.windows/g
s/ops\/exact\/api\.py/functional\/exact.py/g
s/ops\/linear\/api\.py/functional\/linear.py/g
s/ops\/neighborhood\/api\.py/functional\/neighborhood.py/g
