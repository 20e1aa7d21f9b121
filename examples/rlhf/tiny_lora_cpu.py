# The tiny config with LoRA on the actor and the critic (peft): only the adapters (and the
# critic's new value head) train; the base weights stay frozen. ChatLearn's keys.
_base_ = "./tiny_pipe_cpu.py"

model_configs = dict(
    policy=dict(
        trainer_config=dict(
            enable_lora=True,
            lora_dim=8,  # rank
            lora_alpha=16,  # scaling = lora_alpha / lora_dim
            lora_dropout=0.0,
            # ChatLearn's layer classes (all linear layers of the blocks), or HF module
            # names, e.g. "q_proj,v_proj".
            lora_layer="ColumnParallelLinear,LinearLayer,RowParallelLinear",
            lr=1e-2,
        ),
        # 'merged' (base + adapter under the base names), 'adapter' (vLLM LoRARequest per
        # policy version) or 'auto' (= 'merged', measured faster: BENCHMARKS.md).
        generator_config=dict(lora_sync="auto"),
    ),
    critic=dict(
        trainer_config=dict(enable_lora=True, lora_dim=8, lora_alpha=16, lr=1e-2),
    ),
)

train_config = dict(work_dir="work_dirs/tiny_lora_cpu")
