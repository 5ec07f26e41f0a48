//! The one table of what each gRPC method needs. A method that is not in it
//! is refused, whoever calls it: adding an RPC without deciding who may call
//! it cannot open it to everyone (the test below fails first).

use super::roles::Permission;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Open to anyone, authenticated or not: health probes.
    Public,
    /// An authenticated principal holding this permission (for some saga
    /// type; the API checks the saga type once it knows it).
    Needs(Permission),
}

/// Every method served, by its HTTP/2 path.
pub const METHODS: &[(&str, Access)] = &[
    (
        "/saga.v1.SagaService/StartSaga",
        Access::Needs(Permission::Start),
    ),
    (
        "/saga.v1.SagaService/GetSaga",
        Access::Needs(Permission::Read),
    ),
    (
        "/saga.v1.SagaService/ListSagas",
        Access::Needs(Permission::Read),
    ),
    (
        "/saga.v1.SagaService/WatchSaga",
        Access::Needs(Permission::Read),
    ),
    (
        "/saga.v1.SagaService/ListSagaTypes",
        Access::Needs(Permission::Read),
    ),
    (
        "/saga.v1.SagaService/CancelSaga",
        Access::Needs(Permission::Operate),
    ),
    (
        "/saga.v1.SagaService/RetrySaga",
        Access::Needs(Permission::Operate),
    ),
    (
        "/saga.v1.SagaService/RetryFailedSagas",
        Access::Needs(Permission::Operate),
    ),
    (
        "/saga.v1.SagaService/ListDeadLetters",
        Access::Needs(Permission::Read),
    ),
    (
        "/saga.v1.SagaService/RequeueDeadLetters",
        Access::Needs(Permission::Operate),
    ),
    (
        "/saga.v1.SagaService/DiscardDeadLetters",
        Access::Needs(Permission::Operate),
    ),
    ("/grpc.health.v1.Health/Check", Access::Public),
    ("/grpc.health.v1.Health/Watch", Access::Public),
    ("/grpc.health.v1.Health/List", Access::Public),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Needs(Permission::Read),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Needs(Permission::Read),
    ),
];

/// What `path` needs; `None`: not in the table, refused.
pub fn access(path: &str) -> Option<Access> {
    METHODS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, access)| *access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every RPC of every service the orchestrator serves, from the
    /// descriptor sets it serves by reflection: a new RPC without an entry
    /// fails here.
    #[test]
    fn every_served_rpc_is_in_the_table_and_nothing_else_is_allowed() {
        let mut served = Vec::new();
        for set in [
            saga_proto::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        served.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        assert!(served.len() >= 9, "{served:?}");
        for path in &served {
            assert!(access(path).is_some(), "{path} is not in METHODS");
        }
        assert_eq!(access("/saga.v1.SagaService/DeleteSaga"), None);
        assert_eq!(access("/saga.v1.SagaService/startsaga"), None);
        assert_eq!(access(""), None);
    }
}
