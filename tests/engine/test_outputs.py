import dataclasses
import pickle

from vlmserve.engine.outputs import EngineCoreOutput, TokenLogprob


def test_engine_core_output_survives_the_pipe_with_every_field():
    out = EngineCoreOutput(
        req_id="r1", new_token_ids=[5, 6], finish_reason="stop", stop_reason=6, num_cached_tokens=32,
        new_logprobs=[TokenLogprob(token_id=5, logprob=-0.5, top=[(5, -0.5), (7, -1.0)])],
    )
    back = pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == out
    # Every field travels: a field added to the dataclass must be added to __reduce__ too.
    assert len(out.__reduce__()[1]) == len(dataclasses.fields(EngineCoreOutput))
