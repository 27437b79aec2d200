"""Defaults for every key of a pretraining run. Family files (configs/gpt.py, ...) start here.

    python -m train --config=configs/gpt.py:tiny --workdir=/tmp/run

Every key exists here with its type, so that a misspelt or unknown key, or a value of
the wrong type, fails at once (see configs/loader.py). 0 or "" means "derive it" where
a comment says so.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000  # optimizer steps in the whole run
    # What the run optimizes (train/objectives/): lm | mlm | sft | classification | qa | reward | dpo |
    # ppo | grpo | rloo | distill;
    # "": lm for the decoder families, mlm for bert.
    c.objective = ""
    c.init_from = ""  # "": random init; hf:DIR (a Hugging Face directory) | run:WORKDIR[@STEP] (a train run)

    c.model = ml_collections.ConfigDict(dict(
        family="gpt",  # gpt | llama | qwen | moe | deepseek: the decoder of models/gpt.py, told apart by
        # the keys below; bert: the encoder of models/bert.py trained as a masked LM
        vocab_size=0,  # 0: the tokenizer's vocabulary size
        num_layers=4,
        max_len=256,  # context length; must be >= data.seq_len
        positional="learned",  # learned (a position table, GPT-2) | rope (rotary, LLaMA/Qwen)
        # rope_* apply only with positional="rope" (models/layers/positional.py RopeConfig).
        rope_theta=10000.0,  # LLaMA 2: 1e4, LLaMA 3: 5e5, Qwen2/3: 1e6
        rope_scaling="default",  # default | linear | llama3 | yarn | dynamic
        rope_factor=1.0,  # context extension factor (all scalings but "default")
        rope_original_max_len=0,  # pre-training context for llama3/yarn/dynamic; 0: max_len
        tie_embeddings=True,
        remat="none",  # none | full | dots_saveable | nothing_saveable
        dtype="float32",  # compute dtype; "bfloat16" for mixed precision (params stay float32)
        param_dtype="float32",
        block=dict(d_model=128, num_heads=4, num_kv_heads=0, head_dim=0, d_ff=512, mlp_activation="gelu_tanh",
                   norm="layernorm", norm_position="pre", norm_eps=1e-5, dropout_rate=0.0,
                   attention_dropout_rate=0.0, use_bias=True,
                   # The three bias switches are "auto" (follow use_bias) | "true" | "false":
                   # ConfigDict keeps one type per key, so a bool could not also say "unset".
                   qkv_bias="auto",  # Qwen2: "true" with use_bias=False
                   out_bias="auto",
                   mlp_bias="auto",
                   qk_norm=False,  # RMSNorm on each query and key head before RoPE (Qwen3)
                   sliding_window=0,  # local attention over the last N keys; 0: none
                   # How attention is computed (models/layers/attention.py attend): xla (the [B, N, T, S]
                   # weights) | blockwise (flash-style, O(T) memory) | pallas (that as a Pallas kernel) |
                   # cudnn (GPU and bf16/fp16 only) | ring (blockwise with the sequence split over the
                   # `context` mesh axis: strategies cp / fsdp_cp need it). Not xla: needs
                   # attention_dropout_rate=0, no mla.
                   attention_impl="xla",
                   # KV-cache storage of self-attention (models/layers/kv_cache.py): "" (the compute dtype) |
                   # int8 | fp8 (e4m3), per-head scales; decoders only. A run setting (`python -m inference
                   # --kv_cache=int8` switches it on for a model trained without it).
                   kv_cache_quant="",
                   ),
        type_vocab_size=2,  # bert only: rows of the token-type (sentence A/B) table
        # Mixture of experts in the MLP of every layer past model.first_dense_layers
        # (models/layers/moe.py MoEConfig); family moe | deepseek.
        moe=dict(num_experts=0,  # 0: a dense MLP (no experts)
                 num_experts_per_tok=2,  # k, experts each token is routed to
                 expert_d_ff=0,  # hidden width of each expert; 0: block.d_ff
                 score_func="softmax",  # softmax (Mixtral, Qwen3-MoE) | sigmoid (DeepSeek-V3)
                 norm_topk_prob=True,  # renormalise the k chosen weights to sum to 1
                 capacity_factor=0.0,  # 0: dropless; > 0: each expert takes ceil(f * tokens * k / E)
                 dropless_impl="sparse",  # dropless: sparse (grouped matmuls, routed experts only) | dense
                 grouped_matmul="auto",  # sparse: auto (tiled on CPU, else ragged_dot) | ragged_dot | tiled
                 # auto: sharding constraints, the compiler picks the collectives | all_to_all: tokens
                 # sent to their experts' devices by shard_map all-to-alls (needs sharding.strategy=ep)
                 dispatch="auto",
                 aux_loss_weight=0.01,  # load-balancing loss (Switch) added to the training loss
                 router_z_loss_weight=0.0,  # router z-loss (ST-MoE) added to the training loss
                 seq_aux_loss_weight=0.0,  # DeepSeek-V3's sequence-wise balance loss (its alpha: 1e-4)
                 num_shared_experts=0,  # experts every token goes through (DeepSeek)
                 shared_d_ff=0,  # hidden width of each shared expert; 0: expert_d_ff
                 routed_scaling_factor=1.0,  # multiplies the routed experts' weights (DeepSeek-V3: 2.5)
                 n_group=1,  # experts split into groups; a token picks topk_group groups, then
                 topk_group=1,  # its k experts among them (DeepSeek-V3: 8 and 4)
                 score_correction_bias=False,  # a per-expert bias added to the scores for the top-k
                 # choice only: DeepSeek-V3's aux-loss-free balancing. After each optimizer step
                 # it moves by bias_update_rate towards equal load; 0: never updated.
                 bias_update_rate=0.0,
                 ),
        first_dense_layers=0,  # with experts, the first this-many layers keep a dense MLP of block.d_ff
        # Multi-head latent attention (models/layers/mla.py, DeepSeek-V2/V3) instead of block.num_kv_heads
        # and head_dim; needs positional="rope" (the rope_* keys apply to its rotary dims).
        mla=dict(kv_lora_rank=0,  # width of the compressed key/value latent; 0: standard attention
                 q_lora_rank=0,  # width of the query latent; 0: a full-rank query projection
                 qk_nope_head_dim=0,  # per-head query/key dims without position
                 qk_rope_head_dim=0,  # rotary query dims per head (one rotary key shared by all heads)
                 v_head_dim=0,  # value dims per head
                 ),
        mtp_depth=0,  # multi-token prediction modules (DeepSeek-V3): module k predicts token i + k + 1
        mtp_loss_weight=0.3,  # their mean cross-entropy's weight in the training loss
        scan_layers=False,  # one compiled layer run by nn.scan (faster compiles for deep models)
        # objective lm | sft: the loss applies the LM head this many positions at a time (a scan whose
        # backward recomputes each chunk), never holding the [batch, seq_len, vocab] logits; 0: off
        loss_chunk_size=0,
    ))
    # Fine-tuning: what trains (train/trainable.py) and the parameter-efficient methods
    # (models/layers/peft.py). Parameter paths are '/'-joined, e.g. layer_0/self_attention/query.
    c.finetune = ml_collections.ConfigDict(dict(
        method="full",  # full | lora | qlora | prefix | adapter
        freeze="",  # full: regex (re.search) of parameter paths kept frozen; "": none
        train="",  # the PEFT methods: regex of further parameters that train (e.g. a task head)
        lora=dict(targets=r"(query|key|value|out|wi|wi_gate|wi_up|wo)$", rank=8, alpha=16.0, dropout=0.0,
                  rslora=False, dora=False),
        qlora=dict(quant="nf4",  # nf4 | int8: storage of the frozen base (LoRA on top)
                   block_size=64, double_quant=True),
        prefix=dict(length=16, mlp_hidden=0),  # mlp_hidden > 0: MLP reparameterization
        adapter=dict(kind="houlsby", hidden=64),  # houlsby (serial) | parallel
        # Sparse fine-tuning of a pruned checkpoint (init_from, compress/prune.py): the zero weights of
        # the blocks' attention and MLP kernels stay zero (train/optimizer.py hold_zeros)
        keep_sparsity=False,
    ))
    # Supervised fine-tuning data (objective=sft, data/sft.py): chat JSONL from data.source.
    c.sft = ml_collections.ConfigDict(dict(
        chat_template="",  # "": the tokenizer's own (ChatML if it has none) | chatml | llama3 | a Jinja string
        packing="greedy",  # none (one conversation per row) | greedy (in order) | bfd (best-fit decreasing)
        pack_window=1000,  # conversations binned together
    ))
    # BERT task fine-tuning (objective=classification | qa, data/tasks.py): examples from data.source
    # (files:PATH with .jsonl/.csv/SQuAD .json, '{split}' in PATH naming the split's file, or tfds:NAME);
    # the text is data.text_key.
    c.task = ml_collections.ConfigDict(dict(
        num_labels=0,  # classes; 0: from the labels
        labels="",  # comma-separated class names in id order; "": the training split's labels sorted (ids as given)
        text_pair_key="",  # the second text of a pair (sentence B); "": single texts
        label_key="label",
        question_key="question", context_key="context", answers_key="answers", id_key="id",  # qa (SQuAD)
        doc_stride=128,  # qa: tokens shared by consecutive windows of a long context
        max_query_len=64,  # qa: questions cut to this many tokens
        max_answer_length=30,  # qa post-processing: longest answer, in tokens
        n_best=20,  # qa post-processing: start and end candidates per window
    ))
    # Alignment (train/objectives/: reward, dpo, ppo, grpo, rloo). The frozen reference model of
    # dpo, ppo and grpo: "": the starting weights (init_from); hf:DIR | run:WORKDIR[@STEP]: another
    # checkpoint of the policy's architecture.
    c.reference = ""
    # Preference data (objective=reward | dpo): JSONL rows {prompt, chosen, rejected} (paired) or
    # {prompt, completion, label} (kto, unpaired), plain text or chat messages (rendered with
    # sft.chat_template); prompt tokens are masked.
    c.preference = ml_collections.ConfigDict(dict(
        prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
        completion_key="completion", label_key="label",  # kto's unpaired rows
        margin_key="",  # reward: a per-row margin field for the Bradley-Terry loss; "": none
        max_prompt_len=0,  # prompt tokens kept (the last ones); 0: no cut
    ))
    # Offline preference optimization (objective=dpo, train/objectives/dpo.py).
    c.dpo = ml_collections.ConfigDict(dict(
        loss="sigmoid",  # sigmoid (DPO; label_smoothing > 0: conservative) | ipo | simpo | orpo | kto
        beta=0.1,  # DPO's and KTO's beta, IPO's tau, SimPO's beta, ORPO's lambda (the odds-ratio weight)
        label_smoothing=0.0,  # eps, the share of flipped labels: sigmoid (conservative DPO) and simpo only
        simpo_gamma=0.5,  # SimPO's target reward margin gamma (TRL's CPO simpo_gamma)
        kto_desirable_weight=1.0, kto_undesirable_weight=1.0,  # KTO's lambda_D and lambda_U
        precompute_reference=True,  # the reference's log-probs once per dataset; False: on the fly
    ))
    # Online RL (objective=ppo | grpo | rloo, train/objectives/, train/rollout.py): prompts from
    # data.source (task:NAME for the verifiable tasks of data/verifiable.py, or prompt JSONL).
    c.rl = ml_collections.ConfigDict(dict(
        num_generations=8,  # G completions per prompt (grpo, rloo); ppo: 1
        max_new_tokens=32,
        temperature=1.0, top_p=1.0, top_k=0,  # rollout sampling (0: no top-k)
        rewards="accuracy",  # comma list: accuracy | format | model | module:function
        reward_weights="",  # comma floats, one per reward; "": 1 each
        reward_model="",  # the `model` reward: run:WORKDIR[@STEP] | hf:DIR of a reward model
        kl_coef=0.04,  # beta: per-token KL penalty (ppo) / KL loss (grpo) to the reference; 0: none
        kl_target=0.0,  # ppo: > 0 makes the coefficient adaptive (Ziegler et al.) towards this KL
        kl_horizon=10000,
        epochs=1,  # updates over each rollout (ppo epochs / grpo iterations)
        minibatches=1,  # optimizer steps per epoch; each takes rollout rows / minibatches
        clip_eps=0.2,
        clip_eps_high=0.0,  # upper clip (DAPO's clip-higher); 0: clip_eps
        loss_type="grpo",  # grpo | dr_grpo | dapo | bnpo
        scale_rewards=True,  # grpo: divide group advantages by their std (False: Dr. GRPO)
        value_head="shared",  # ppo: shared (a head on the policy's trunk) | separate (a value model)
        vf_coef=0.1, vf_clip=0.2,
        gamma=1.0, lam=0.95,
        whiten_rewards=False,
    ))
    # Knowledge distillation (objective=distill, train/objectives/distill.py): the student (this run's
    # model) learns from a frozen teacher that shares its tokenizer.
    c.distill = ml_collections.ConfigDict(dict(
        teacher="",  # PATH[@STEP] of a `python -m train` workdir, or a Hugging Face directory
        mode="logits",  # logits (KL to the teacher's token distributions) | sequence (decoders: CE on the
        # teacher's generations, Kim & Rush 2016) | minilm (bert: last-layer attention and value
        # relations, Wang et al. 2020)
        alpha=0.5,  # logits, minilm: weight of the distillation term; 1 - alpha: the hard-label cross-entropy
        temperature=2.0,  # logits: T of both softmaxes; the KL is scaled by T^2
        kl="forward",  # logits: forward KL(teacher || student) | reverse KL(student || teacher)
        relation_heads=0,  # minilm: R relation heads of the concatenated q, k, v; 0: the student's num_heads
        # sequence: num_prompts training documents cut to their first prompt_tokens tokens, continued
        # by the teacher for max_new_tokens (greedy if sample_temperature is 0), written once under WORKDIR
        num_prompts=256, prompt_tokens=32, max_new_tokens=96, sample_temperature=0.0,
    ))
    # The verifiable tasks (data/verifiable.py): train and held-out problems split by seed.
    c.verifiable = ml_collections.ConfigDict(dict(
        num_train=2000, num_eval=200,
        seed=0,
        digits=2,  # addition, multiplication: operands in [0, 10**digits)
        list_len=5, max_value=100,  # sorting: list_len numbers in [0, max_value)
        math_difficulty="easy",  # math/arithmetic__*: easy | medium | hard | all (mathematics_dataset's entropy)
        format="answer",  # answer (the completion is the answer) | tags (<think>..</think><answer>..</answer>)
    ))
    c.tokenizer = ml_collections.ConfigDict(dict(
        path="",  # "": train a byte-level BPE on a sample of the training split, saved in the workdir
        vocab_size=4096,  # for a trained BPE
        trainer="lmlab",  # lmlab (ours, pure Python) | tokenizers (Hugging Face's, in Rust, for large samples)
        train_bytes=10_000_000,  # text sampled (seeded by data.shuffle_seed) to train on; 0: the whole split
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="embedded",  # embedded | files:PATH[,PATH] | tfds:NAME[:CONFIG] | prepared:DIR (python -m data.prepare)
        text_key="text",
        split_paragraphs=False,
        seq_len=128,
        batch_size=16,  # global batch, over all devices and processes
        shuffle_seed=0,
        shuffle_window=1024,  # packed rows shuffled together (1: documents only)
        data_dir="",  # "": WORKDIR/tfds
        validation_fraction=0.05,
        train_split="train",
        eval_split="validation",
        worker_count=0,
    ))
    # How the trainer runs (train/trainer.py), beside what it trains.
    c.train = ml_collections.ConfigDict(dict(
        # JAX's persistent compilation cache (train/compilation_cache.py): a restart loads its compiled
        # programs. auto: $LMLAB_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/lmlab/jax_cache (~/.cache/...);
        # a directory; "" or none: off
        compilation_cache_dir="auto",
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3,  # peak learning rate
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,
        grad_clip_norm=1.0,  # 0: no clipping
        grad_accum_steps=1,  # micro-batches per step; data.batch_size is split among them
        z_loss=1e-4,
        label_smoothing=0.0,
    ))
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine",  # cosine | wsd | constant | rsqrt
        warmup_steps=100,
        min_lr_ratio=0.1,
        decay_fraction=0.2,  # wsd
        decay_shape="linear",  # wsd: linear | cosine | sqrt
    ))
    c.sharding = ml_collections.ConfigDict(dict(
        # dp | zero1 | zero2 | zero3 | fsdp | tp | tp_sp | fsdp_tp | ep | pp | pp_fsdp | pp_tp | pp_fsdp_tp
        # | cp | fsdp_cp (sharding/strategies.py)
        strategy="dp",
        mesh="",  # e.g. "data=2,fsdp=2,tensor=2" (-1: the rest); "": the strategy's default mesh
        # pp*: micro-batches of each (accumulation) micro-batch in the pipeline; the bubble is
        # (stages - 1) / (pipeline_microbatches + stages - 1) (models/layers/pipeline.py)
        pipeline_microbatches=4,
        # pp*: gpipe (all forwards, then all backwards); 1F1B is the library schedule
        # sharding.pipeline.one_f_one_b, not yet a training-step option
        pipeline_schedule="gpipe",
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        save_interval_steps=200,
        max_to_keep=3,
        async_save=True,
    ))
    c.logging = ml_collections.ConfigDict(dict(
        log_every_steps=10,
        tensorboard=True,
        progress_bar=True,
        peak_flops=0.0,  # FLOP/s of ONE device for MFU; 0: datasheet peak for model.dtype, else measured
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=200,  # 0: only at the end
        max_batches=0,  # 0: the whole validation split
        num_samples=3,
        sample_tokens=48,
        temperature=0.8,
        prompt="The ",
        # Harness tasks (evals/: a built-in name or a .yaml/.jsonl task file), comma-separated, scored on
        # the live parameters at the start, every every_steps and at the end, logged as
        # eval/<task>/<metric> (train/task_eval.py); "": none.
        tasks="",
        task_limit=0,  # examples per task; 0: all
    ))
    return c


def tiny_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run settings of every family's `tiny` preset: 30 steps of 8 x 64 tokens, for tests."""
    c.steps = 30
    c.tokenizer.vocab_size = 512
    c.data.update(seq_len=64, batch_size=8)
    c.optimizer.update(lr=3e-3)
    c.schedule.update(warmup_steps=5)
    c.checkpoint.update(save_interval_steps=10)
    c.logging.update(log_every_steps=5)
    c.eval.update(every_steps=0, max_batches=4, num_samples=1, sample_tokens=16)
    return c
