"""Beam wrappers of the per-document stages, with their counters as Beam metrics."""

import apache_beam as beam
from apache_beam.metrics import Metrics

from data.prepare.stage import Document, DocumentStage, count_outcome

NAMESPACE = "data.prepare"
DROPPED = "dropped"  # the tag of ApplyStage's output of dropped documents (id, stage, reason)


class _StageFn(beam.DoFn):
    def __init__(self, stage: DocumentStage):
        self._stage = stage
        self._counters = {}

    def _add(self, counts) -> None:
        for name, amount in counts.items():
            if name not in self._counters:
                self._counters[name] = Metrics.counter(f"{NAMESPACE}.{self._stage.name}", name)
            self._counters[name].inc(amount)

    def process(self, document: Document):
        outcome = self._stage(document.text)
        count_outcome(outcome, self._add)
        if outcome.text is None:
            yield beam.pvalue.TaggedOutput(DROPPED, (document.id, self._stage.name, outcome.reason))
        else:
            yield Document(document.id, outcome.text)


class ApplyStage(beam.PTransform):
    """Documents -> the documents the stage keeps (main output) and `dropped` (id, stage, reason)."""

    def __init__(self, stage: DocumentStage):
        super().__init__(label=stage.name)
        self._stage = stage

    def expand(self, documents):
        return documents | beam.ParDo(_StageFn(self._stage)).with_outputs(DROPPED, main="kept")
