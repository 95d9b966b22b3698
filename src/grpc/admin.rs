//! The gRPC adapter for `gameball.profiles.v1.AdminService`: one implementation of the
//! generated trait that hands each RPC to the part it belongs to (dead letters in
//! `super::dead_letters`, backups in `super::backup`, reconcile jobs in `super::reconcile`). It holds no logic of its own: a new
//! group of admin RPCs gets its own module and a field here. Authentication is wired up in
//! `crate::server`.

use tonic::{Request, Response, Status};

use super::backup::{BackupApi, BackupStream};
use super::dead_letters::DeadLetterApi;
use crate::pb;
use crate::pb::admin_service_server::AdminService;
use crate::reconcile::ReconcileJobs;

/// The AdminService implementation.
pub struct AdminApi {
    dead_letters: DeadLetterApi,
    backups: BackupApi,
    reconcile: ReconcileJobs,
}

impl AdminApi {
    /// The service over these parts.
    pub fn new(
        dead_letters: DeadLetterApi,
        backups: BackupApi,
        reconcile: ReconcileJobs,
    ) -> AdminApi {
        AdminApi {
            dead_letters,
            backups,
            reconcile,
        }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        self.dead_letters.list_dead_letters(request).await
    }

    async fn get_dead_letter(
        &self,
        request: Request<pb::GetDeadLetterRequest>,
    ) -> Result<Response<pb::GetDeadLetterResponse>, Status> {
        self.dead_letters.get_dead_letter(request).await
    }

    async fn replay_dead_letter(
        &self,
        request: Request<pb::ReplayDeadLetterRequest>,
    ) -> Result<Response<pb::ReplayDeadLetterResponse>, Status> {
        self.dead_letters.replay_dead_letter(request).await
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        self.dead_letters.purge_dead_letters(request).await
    }

    type BackupStream = BackupStream;

    async fn backup(
        &self,
        _request: Request<pb::BackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        self.backups.backup()
    }

    async fn reconcile_profiles(
        &self,
        request: Request<pb::ReconcileProfilesRequest>,
    ) -> Result<Response<pb::ReconcileProfilesResponse>, Status> {
        super::reconcile::reconcile_profiles(&self.reconcile, request.into_inner())
            .map(Response::new)
    }

    async fn get_reconcile_job(
        &self,
        request: Request<pb::GetReconcileJobRequest>,
    ) -> Result<Response<pb::GetReconcileJobResponse>, Status> {
        super::reconcile::get_reconcile_job(&self.reconcile, request.into_inner())
            .map(Response::new)
    }

    async fn cancel_reconcile_job(
        &self,
        request: Request<pb::CancelReconcileJobRequest>,
    ) -> Result<Response<pb::CancelReconcileJobResponse>, Status> {
        super::reconcile::cancel_reconcile_job(&self.reconcile, request.into_inner())
            .await
            .map(Response::new)
    }
}
