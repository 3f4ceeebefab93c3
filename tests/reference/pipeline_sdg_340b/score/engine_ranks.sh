# The engine step started by the orchestrator's task on node 0 (PORT: a free port chosen on node 0 when the job starts):
srun --overlap --nodes=2 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=1 --mem=0 --distribution=block --kill-on-bad-exit=1 --container-image=nvcr.io/nvidia/nemo:24.05 --container-mounts=/lustre/models:/models python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"

# What each rank runs, with the environment srun gives it:
# rank 0 on node 0, GPU 0 (serves HTTP)
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 1 on node 0, GPU 1 (worker)
SLURM_PROCID=1 SLURM_LOCALID=1 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 2 on node 0, GPU 2 (worker)
SLURM_PROCID=2 SLURM_LOCALID=2 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 3 on node 0, GPU 3 (worker)
SLURM_PROCID=3 SLURM_LOCALID=3 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 4 on node 0, GPU 4 (worker)
SLURM_PROCID=4 SLURM_LOCALID=4 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 5 on node 0, GPU 5 (worker)
SLURM_PROCID=5 SLURM_LOCALID=5 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 6 on node 0, GPU 6 (worker)
SLURM_PROCID=6 SLURM_LOCALID=6 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 7 on node 0, GPU 7 (worker)
SLURM_PROCID=7 SLURM_LOCALID=7 SLURM_NODEID=0 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 8 on node 1, GPU 0 (worker)
SLURM_PROCID=8 SLURM_LOCALID=0 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 9 on node 1, GPU 1 (worker)
SLURM_PROCID=9 SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 10 on node 1, GPU 2 (worker)
SLURM_PROCID=10 SLURM_LOCALID=2 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 11 on node 1, GPU 3 (worker)
SLURM_PROCID=11 SLURM_LOCALID=3 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 12 on node 1, GPU 4 (worker)
SLURM_PROCID=12 SLURM_LOCALID=4 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 13 on node 1, GPU 5 (worker)
SLURM_PROCID=13 SLURM_LOCALID=5 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 14 on node 1, GPU 6 (worker)
SLURM_PROCID=14 SLURM_LOCALID=6 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
# rank 15 on node 1, GPU 7 (worker)
SLURM_PROCID=15 SLURM_LOCALID=7 SLURM_NODEID=1 SLURM_NTASKS=16 python3 /opt/NeMo-Aligner/examples/nlp/gpt/serve_reward_model.py rm_model_file=/models/Nemotron-4-340B-Reward.nemo trainer.num_nodes=2 trainer.devices=8 ++model.tensor_model_parallel_size=8 ++model.pipeline_model_parallel_size=2 inference.micro_batch_size=2 inference.port="$PORT"
