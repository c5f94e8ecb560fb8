//! librdkafka's in-process mock Kafka cluster, for tests and demos that need no broker.
//!
//! librdkafka's mock cluster is not `Send`; [`MockKafka`] owns it on a thread of its own and
//! takes commands from any thread, so tests and async code can share it. Dropping it stops the
//! cluster.

use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;

/// A fault to inject into produce requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceFault {
    /// `NOT_ENOUGH_REPLICAS`: fewer in-sync replicas than `min.insync.replicas`.
    NotEnoughReplicas,
    /// `LEADER_NOT_AVAILABLE`: a leader election is going on.
    LeaderNotAvailable,
    /// `NOT_LEADER_FOR_PARTITION`: the partition moved.
    NotLeaderForPartition,
    /// `REQUEST_TIMED_OUT`: the broker did not complete the request in time.
    RequestTimedOut,
    /// `_TRANSPORT`: the connection breaks.
    Transport,
    /// `MESSAGE_TOO_LARGE`: the broker refuses the batch (permanent).
    MessageTooLarge,
    /// `NETWORK_EXCEPTION`: an error librdkafka does not retry itself (it fails the messages of
    /// that request at once, not stored) but herald classifies transient and retries: the way
    /// to make a delivery report fail while later messages of the same partition go through.
    NetworkException,
    /// `OUT_OF_ORDER_SEQUENCE_NUMBER`: the broker and the idempotent producer disagree on the
    /// sequence; for the first request in flight librdkafka raises a fatal error, and the
    /// transport builds a new producer.
    OutOfOrderSequenceNumber,
}

impl ProduceFault {
    fn code(self) -> RDKafkaRespErr {
        use RDKafkaRespErr as E;
        match self {
            Self::NotEnoughReplicas => E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            Self::LeaderNotAvailable => E::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            Self::NotLeaderForPartition => E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            Self::RequestTimedOut => E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            Self::Transport => E::RD_KAFKA_RESP_ERR__TRANSPORT,
            Self::MessageTooLarge => E::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            Self::NetworkException => E::RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION,
            Self::OutOfOrderSequenceNumber => E::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        }
    }
}

/// Why a mock-cluster command failed.
#[derive(Debug, thiserror::Error)]
#[error("mock Kafka cluster: {0}")]
pub struct MockError(String);

type Reply = mpsc::Sender<Result<(), String>>;

enum Command {
    CreateTopic(String, i32, i32, Reply),
    SetLeader(String, i32, Option<i32>, Reply),
    ProduceFaults(Vec<ProduceFault>, Reply),
    RefuseProducerIds(usize, Reply),
    BrokerDown(i32, Reply),
    BrokerUp(i32, Reply),
    RoundTrip(i32, Duration, Reply),
}

/// A running mock cluster. `Send + Sync`; commands wait for the cluster's answer.
pub struct MockKafka {
    bootstrap: String,
    brokers: i32,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers (ids 1..=brokers) on loopback ports.
    pub fn start(brokers: i32) -> Result<Self, MockError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (tx, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("herald-mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _told = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if ready_tx.send(Ok(cluster.bootstrap_servers())).is_err() {
                    return;
                }
                // Runs until every sender is gone (the handle dropped).
                for command in rx {
                    let (result, reply) = match command {
                        Command::CreateTopic(name, partitions, replication, reply) => {
                            (cluster.create_topic(&name, partitions, replication), reply)
                        }
                        Command::SetLeader(topic, partition, broker, reply) => {
                            (cluster.partition_leader(&topic, partition, broker), reply)
                        }
                        Command::ProduceFaults(faults, reply) => {
                            let codes: Vec<RDKafkaRespErr> =
                                faults.iter().map(|f| f.code()).collect();
                            cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &codes);
                            (Ok(()), reply)
                        }
                        Command::RefuseProducerIds(n, reply) => {
                            let codes = vec![
                                RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED;
                                n
                            ];
                            cluster.request_errors(
                                rdkafka::types::RDKafkaApiKey::InitProducerId,
                                &codes,
                            );
                            (Ok(()), reply)
                        }
                        Command::BrokerDown(id, reply) => (cluster.broker_down(id), reply),
                        Command::BrokerUp(id, reply) => (cluster.broker_up(id), reply),
                        Command::RoundTrip(id, rtt, reply) => {
                            (cluster.broker_round_trip_time(id, rtt), reply)
                        }
                    };
                    let _told = reply.send(result.map_err(|e| e.to_string()));
                }
            })
            .map_err(|e| MockError(format!("could not start its thread: {e}")))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| MockError("its thread ended before starting".into()))?
            .map_err(MockError)?;
        Ok(Self {
            bootstrap,
            brokers,
            commands: Mutex::new(Some(tx)),
            thread: Some(thread),
        })
    }

    /// `host:port,...` of the mock brokers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Number of brokers.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), MockError> {
        let (reply, answer) = mpsc::channel();
        {
            let guard = self
                .commands
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(tx) = guard.as_ref() else {
                return Err(MockError("stopped".into()));
            };
            tx.send(make(reply))
                .map_err(|_| MockError("its thread is gone".into()))?;
        }
        answer
            .recv()
            .map_err(|_| MockError("no answer from its thread".into()))?
            .map_err(MockError)
    }

    /// Creates a topic with `partitions` partitions (the mock does not auto-create them
    /// reliably: create what a test uses).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), MockError> {
        self.ask(|r| Command::CreateTopic(name.to_owned(), partitions, 1, r))
    }

    /// Creates a topic whose partitions are replicated on `replication` brokers.
    pub fn create_replicated_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: i32,
    ) -> Result<(), MockError> {
        self.ask(|r| Command::CreateTopic(name.to_owned(), partitions, replication, r))
    }

    /// Makes broker `broker` the leader of `partition` of `topic` (`None`: no leader), as a
    /// cluster's controller does when the leader dies. The mock does not elect leaders by
    /// itself: [`MockKafka::broker_down`] alone leaves the partition led by a broker that is
    /// down.
    pub fn set_leader(
        &self,
        topic: &str,
        partition: i32,
        broker: Option<i32>,
    ) -> Result<(), MockError> {
        self.ask(|r| Command::SetLeader(topic.to_owned(), partition, broker, r))
    }

    /// Makes the next produce requests (one per fault, in order, on whichever broker gets
    /// them) fail with these errors.
    pub fn fail_produce_requests(&self, faults: &[ProduceFault]) -> Result<(), MockError> {
        self.ask(|r| Command::ProduceFaults(faults.to_vec(), r))
    }

    /// Makes the next `n` requests for a producer id (`InitProducerId`, what an idempotent
    /// producer asks first) fail with `CLUSTER_AUTHORIZATION_FAILED`: a principal without
    /// the `IdempotentWrite` ACL.
    pub fn refuse_producer_ids(&self, n: usize) -> Result<(), MockError> {
        self.ask(|r| Command::RefuseProducerIds(n, r))
    }

    /// Takes broker `id` down: its connections close and new ones are refused.
    pub fn broker_down(&self, id: i32) -> Result<(), MockError> {
        self.ask(|r| Command::BrokerDown(id, r))
    }

    /// Brings broker `id` back.
    pub fn broker_up(&self, id: i32) -> Result<(), MockError> {
        self.ask(|r| Command::BrokerUp(id, r))
    }

    /// Adds `rtt` of latency to every response of broker `id`.
    pub fn round_trip_time(&self, id: i32, rtt: Duration) -> Result<(), MockError> {
        self.ask(|r| Command::RoundTrip(id, rtt, r))
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        self.commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = self.thread.take() {
            let _joined = thread.join();
        }
    }
}
